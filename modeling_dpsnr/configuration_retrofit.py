"""Configuration of a pretrained causal LM with a DPSN-R pool read inserted after one of its layers.

The pretrained model keeps its own config (`text_config`, any Llama-family model type); the
inserted memory is described by a few `memory*` fields, and `pool_config()` turns them into the
`DPSNRConfig` that builds the pool and its reasoning loop, so every pool invariant is checked by
DPSNRConfig itself, with errors naming the field.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_dpsnr import DPSNRConfig

# memory kind → (partitions with their share of pool_size, retrieval kind of each)
MEMORIES: dict[str, dict[str, tuple[float, str]]] = {
    "hashed": {"ngram": (1.0, "hashed_ngram")},
    "product_key": {"knowledge": (1.0, "product_key")},
    "both": {"ngram": (0.5, "hashed_ngram"), "knowledge": (0.5, "product_key")},
}
# DPSNRConfig fields that `memory_pool` may set: the pool, its loop, the n-gram hash, the indexer.
# The controller's fields come from `text_config`.
MEMORY_FIELD_PREFIXES = ("pool_", "loop_", "ngram_", "indexer_")


class DPSNRRetrofitConfig(PreTrainedConfig):
    r"""A pretrained causal LM (`text_config`) with a DPSN-R memory read after its layer `memory_layer`.

    Args:
        text_config (`dict` or `PreTrainedConfig`): the pretrained model's config (Llama family: a
            causal LM with `model.model.layers`).
        memory (`str`, "hashed"): what the inserted read looks up. "hashed": hashed n-grams of the last
            tokens (Engram, DeepSeek 2026); "product_key": product-key memory over the state (Lample et
            al. 2019; PEER entries, He 2024); "both": one partition of each, each half of `pool_size`.
        memory_layer (`int`, 0): the read comes after this decoder layer (0-based).
        memory_loop (`bool`, False): False reads each partition once, in the order above (hashed
            first). True runs DPSN-R's reasoning loop over the partitions (`loop_*` in `memory_pool`:
            steps, halting policy, ponder weight; the schedule is derived unless given).
        memory_pool (`dict`, None): DPSNRConfig fields of the memory (`pool_size`, `pool_heads`,
            `pool_topk`, `pool_entry`, `ngram_orders`, `loop_max_steps`, ...), only `pool_*`, `loop_*`,
            `ngram_*` and `indexer_*` names.

    The read is added as `h + g ⊙ (loop(h) − h)` with a gate g initialised to zero (ReZero, Bachlechner
    et al. 2020), so the retrofitted model computes exactly the pretrained logits until g is trained.
    """

    model_type = "dpsnr_retrofit"
    sub_configs_defaults = {"text_config": SubConfigSpec(AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    memory: str = "hashed"
    memory_layer: int = 0
    memory_loop: bool = False
    memory_pool: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # builds text_config from its dict
        if self.memory not in MEMORIES:
            raise ValueError(f"memory must be one of {list(MEMORIES)}, got {self.memory!r}.")
        layers = getattr(self.text_config, "num_hidden_layers", None)
        if not isinstance(layers, int) or not hasattr(self.text_config, "hidden_size"):
            raise ValueError(f"text_config ({type(self.text_config).__name__}) must describe a decoder with "
                             "hidden_size and num_hidden_layers.")
        if isinstance(self.memory_layer, bool) or not isinstance(self.memory_layer, int) or not 0 <= self.memory_layer < layers:
            raise ValueError(f"memory_layer must be a decoder layer index in [0, {layers}), got {self.memory_layer!r}.")
        if not isinstance(self.memory_loop, bool):
            raise ValueError(f"memory_loop must be a bool, got {self.memory_loop!r}.")
        pool = self.memory_pool or {}
        if not isinstance(pool, dict):
            raise ValueError(f"memory_pool must be a dict of DPSNRConfig pool fields, got {pool!r}.")
        foreign = sorted(k for k in pool if not k.startswith(MEMORY_FIELD_PREFIXES))
        if foreign:
            raise ValueError(f"memory_pool sets {foreign}: only pool_*, loop_*, ngram_* and indexer_* fields; the "
                             "controller's come from text_config.")
        if not self.memory_loop and any(k.startswith("loop_") for k in pool):
            raise ValueError("memory_pool sets loop_* fields but memory_loop=False reads each partition once; "
                             "set memory_loop=True to run the reasoning loop.")
        if pool.get("loop_step", "token") != "token":
            raise ValueError("memory_pool['loop_step'] must be 'token': the inserted read has no attention of its own.")
        if pool.get("loop_halting") == "exits":
            raise ValueError("memory_pool['loop_halting'] cannot be 'exits': trained exits need the LM head on every "
                             "step's state, which an inserted memory does not have; use 'fixed', 'threshold' or 'act'.")
        if "ngram_prelude_partition" in pool:
            raise ValueError("memory_pool['ngram_prelude_partition'] does not apply: the inserted read is the memory.")
        self.pool_config()  # the pool's own invariants, checked by DPSNRConfig

    def pool_config(self) -> DPSNRConfig:
        """The DPSNRConfig of the inserted memory: the pool, its loop, and the few controller sizes they
        read (width, vocabulary for the n-gram hash, layer count for the cache layer of the ids)."""
        base = self.text_config
        parts = MEMORIES[self.memory]
        fields = dict(
            vocab_size=base.vocab_size, hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers,
            num_prelude_layers=0, num_attention_heads=1, head_dim=2,  # no attention: placeholders that validate
            rms_norm_eps=getattr(base, "rms_norm_eps", None) or 1e-6,
            initializer_range=getattr(base, "initializer_range", None) or 0.02,
            pool_partitions={name: share for name, (share, _) in parts.items()},
            pool_partition_retrieval={name: kind for name, (_, kind) in parts.items()},
        )
        if not self.memory_loop:  # one read per partition, every token, in partition order
            fields.update(loop_max_steps=len(parts), loop_halting="fixed", loop_phase_schedule=list(parts))
        fields.update(self.memory_pool or {})
        return DPSNRConfig(**fields)


__all__ = ["DPSNRRetrofitConfig", "MEMORIES"]
