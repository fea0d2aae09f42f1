"""Named DPSN-R presets. Each states only what differs from `DPSNRConfig`'s defaults (which are
the `tiny` architecture) and is commented with its measured size.

"total" counts every parameter once (the LM head is tied to the embedding); "active" is what one
token touches at the maximum number of reasoning steps: non-embedding controller parameters,
the loop's own modules (queries, sub-keys, gate, halting head) and steps × heads × k entries.
`tests/test_presets.py` instantiates every preset (on the meta device for the large ones) and
checks both numbers against `MEASURED` below; `python -m modeling_dpsnr.presets` prints them.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict] = {
    # For tests: builds and runs in milliseconds on CPU.
    "debug": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_prelude_layers=1,
        num_attention_heads=4, max_position_embeddings=256,
        pool_size=4096, pool_heads=2, pool_topk=4, pool_key_dim=32, loop_max_steps=4,
    ),
    # CPU demo: d 256, 4 blocks, a 4096-token BPE trained on TinyStories, ~65k neuron entries.
    "micro": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_prelude_layers=2,
        num_attention_heads=4, max_position_embeddings=512,
        pool_size=65536, pool_heads=4, pool_topk=8, pool_key_dim=64, loop_max_steps=4,
    ),
    # d 512, 4 blocks, 8 heads, GPT-2 vocabulary, 100,000 neuron entries 70/20/10, 8 steps.
    # Measured 142.3M total (design: ≈141M) and 14.4M active per token (design: ≈15M); the two
    # design figures cannot both hold exactly, since the fixed parts (102.4M pool + 25.7M
    # embedding) leave ≈13M for the controller if the total is 141M.
    "tiny": dict(),
    # d 768, 8 blocks, GPT-2 vocabulary, ~1M neuron entries.
    "small": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_prelude_layers=3,
        num_attention_heads=12, pool_size=1_048_576, pool_heads=8, pool_topk=8, pool_key_dim=256,
    ),
    # d 1024, 16 blocks, GPT-2 vocabulary, 4M neuron entries.
    "base": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_prelude_layers=6,
        num_attention_heads=16, pool_size=4_194_304, pool_heads=8, pool_topk=16, pool_key_dim=256,
    ),
}

# Measured by `python -m modeling_dpsnr.presets` (total, active per token at max steps).
MEASURED: dict[str, tuple[int, int]] = {
    "debug": (662_849, 109_889),  # 0.7M total, 0.11M active
    "micro": (38_382_273, 3_844_801),  # 38.4M total (33.6M pool), 3.84M active
    "tiny": (142_295_169, 14_425_729),  # 142.3M total (102.4M pool), 14.43M active
    "small": (1_714_520_577, 66_096_897),  # 1.71B total (1.61B pool), 66.1M active
    "base": (8_861_016_833, 221_716_225),  # 8.86B total (8.59B pool), 221.7M active
}


def preset_kwargs(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])


def count_parameters(model) -> tuple[int, int]:
    """(total, active at max steps) for a DPSNRForCausalLM; works on the meta device."""
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    base = model.model.active_params_base()
    active = base + model.config.loop_max_steps * model.model.loop.parameters_per_step()
    return total, active


def build_on_meta(name: str):
    import torch

    from .configuration_dpsnr import DPSNRConfig
    from .modeling_dpsnr import DPSNRForCausalLM

    with torch.device("meta"):
        return DPSNRForCausalLM(DPSNRConfig.from_preset(name))


if __name__ == "__main__":
    for preset in PRESETS:
        total, active = count_parameters(build_on_meta(preset))
        print(f'    "{preset}": ({total}, {active}),  # {total / 1e6:,.1f}M total, {active / 1e6:,.2f}M active')
