"""The KV cache, as DPSN-R uses transformers' `Cache`: its name across 5.x releases, and the layers the
reasoning loop adds past the controller's.

transformers 5.24 renamed the KV cache from `past_key_values` to `cache` (output fields, forward and
generate keywords); 5.23 uses the old name. Users who load remote code bring whatever 5.x release they
have, so the name is read off the library's own output class (a feature check, not a version test),
the outputs inherit the field from it, and `forward` accepts both keywords.

Layers past `num_hidden_layers`: the block step keeps one per reasoning step (reasoning.py), the hashed
n-gram read one for the earlier token ids (hashed.py); `cache_update` appends them to a DynamicCache.
"""

from __future__ import annotations

from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs: ModelOutput) -> Cache | None:
    """The KV cache carried by a transformers output, under either release's field name."""
    return outputs.get(CACHE_NAME)


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a forward was given, as `cache` or as `past_key_values` (never both)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache once, as `cache` or as `past_key_values` (its name before transformers 5.24).")
    return cache if cache is not None else past_key_values


def cache_update(cache, k, v, layer: int):
    """Append k, v to cache layer `layer`, adding layers past the controller's ones like those it has (a
    cache built from the config has exactly num_hidden_layers): dynamic layers to a DynamicCache, static
    layers of the same length to a StaticCache (`generate(cache_implementation="static")`, compiled decoding)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) <= layer:
        if getattr(cache, "layer_class_to_replicate", None) is None:
            from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer

            if isinstance(cache, DynamicCache):
                make = DynamicLayer
            elif layers and all(type(existing) is StaticLayer for existing in layers):
                make = lambda: StaticLayer(max_cache_len=layers[0].max_cache_len)  # noqa: E731
            else:
                raise ValueError(
                    f"this model keeps cache layers past its {len(layers)} blocks (one per reasoning step of "
                    f"loop_step='block', and the ids a hashed n-gram read needs); {type(cache).__name__} cannot add "
                    "them. Use a DynamicCache (the default) or a StaticCache (cache_implementation='static')."
                )
            while len(layers) <= layer:
                layers.append(make())
    return cache.update(k, v, layer)


__all__ = ["CACHE_NAME", "cache_update", "one_cache", "output_cache"]
