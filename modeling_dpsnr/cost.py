"""Cost model: multiply-accumulates and bytes read per token, from the config alone.

Counted as nanoGPT / nanochat count (`estimate_flops`): the matrix products, one multiply-add per
weight touched, plus attention's score and value products over the context it sees; norms,
activations, softmaxes and top-k selections are left out (they are O(width), not O(width²)).
FLOPs = 2 × MACs for a forward pass; a training step (forward + backward) is taken as 3 × the
forward, the usual approximation.

Per token, DPSN-R spends
    controller   L × (attention projections + attention core + SwiGLU MLP)
    lm head      d × V
    loop         steps × (per-step cost of the step kind), where a step costs one read of its
                   partition, the gate d² and the halting head; the block step adds one attention
                   block (projections + core). A read costs what its retrieval kind says
                   (kinds.py, `read_macs`): choosing the rows (product keys: query d·H·c + sub-key
                   scores H·(n1 + n2)·c/2; exhaustive: H·N·c/2; coordinate: the indexer MLP) plus
                   rows × parameters per entry (neuron: u·x and the weighted v); a hashed n-gram read
                   J·d for the weighted rows, 2·d² for W_k and W_v and d for the gate (its hashing
                   is O(J·C) integer work, not counted).
    prelude read the hashed n-gram read after a prelude block, when configured
so `steps` (the mean reasoning steps of a run) is the only quantity that comes from a measurement.
Training with trained exits adds the coda and LM head on every earlier step's state (`flops_per_token`).
"""

from __future__ import annotations

from .configuration_dpsnr import DPSNRConfig


def attention_macs(d: int, heads: int, kv_heads: int, head_dim: int, context: float) -> float:
    """One causal attention block per token: q/k/v/o projections + QKᵀ and AV over `context` keys."""
    projections = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    return projections + 2 * heads * head_dim * context


def block_macs(d: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, context: float) -> float:
    """One pre-norm decoder block with a SwiGLU MLP, per token."""
    return attention_macs(d, heads, kv_heads, head_dim, context) + 3 * d * intermediate


def read_macs(config: DPSNRConfig, partition: str) -> float:
    """One read of `partition` for one token: choosing the rows and combining them."""
    return config.partition_kind(partition).read_macs(config, config.partition_sizes()[partition], config.entry_kind)


def loop_step_macs(config: DPSNRConfig, step: int, context: float) -> float:
    """MACs of reasoning step `step` (0-based) for one token."""
    c = config
    gate = c.hidden_size * c.hidden_size
    halting = c.hidden_size
    macs = read_macs(c, c.loop_phase_schedule[step]) + gate + halting
    if c.loop_step == "block":
        macs += attention_macs(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attention_head_dim, context)
    return macs


def forward_macs(config: DPSNRConfig, steps: float | None = None, context: float | None = None) -> dict[str, float]:
    """MACs per token of one forward pass, by part. `steps`: mean reasoning steps (default: the
    maximum); `context`: keys each query attends to (default: half the trained context, the mean
    over a causal training sequence)."""
    c = config
    steps = c.loop_max_steps if steps is None else steps
    context = c.max_position_embeddings / 2 if context is None else context
    controller = c.num_hidden_layers * block_macs(
        c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attention_head_dim, c.intermediate_size, context
    )
    per_step = [loop_step_macs(c, s, context) for s in range(c.loop_max_steps)]
    whole, frac = int(steps), steps - int(steps)
    loop = sum(per_step[:whole]) + (frac * per_step[whole] if whole < len(per_step) else 0.0)
    lm_head = c.hidden_size * c.vocab_size
    prelude = read_macs(c, c.ngram_prelude_partition) if c.ngram_prelude_partition is not None else 0.0
    return {"controller": controller, "loop": loop, "loop_per_step": sum(per_step) / len(per_step),
            "prelude_read": prelude, "lm_head": lm_head, "total": controller + loop + prelude + lm_head}


def flops_per_token(config: DPSNRConfig, steps: float | None = None, context: float | None = None,
                    training: bool = False, exit_samples: int | None = None) -> float:
    """FLOPs per token: 2 × MACs, × 3 for a training step (forward + backward). Trained exits
    (`loop_halting="exits"`) train every step whatever `steps` is, and run the coda blocks and the
    LM head on each earlier step's state too, or on `exit_samples` of them (the execution setting)."""
    if not (training and config.loop_halting == "exits"):
        return 2 * forward_macs(config, steps, context)["total"] * (3 if training else 1)
    parts = forward_macs(config, config.loop_max_steps, context)
    c = config
    coda = parts["controller"] * (c.num_hidden_layers - c.num_prelude_layers) / c.num_hidden_layers
    earlier = c.loop_max_steps - 1 if exit_samples is None else min(exit_samples, c.loop_max_steps - 1)
    return 2 * (parts["total"] + earlier * (coda + parts["lm_head"])) * 3


def pool_bytes_per_token(config: DPSNRConfig, steps: float | None = None, bytes_per_param: int = 4) -> float:
    """Pool bytes one token reads: its entry rows, and the sub-keys its queries score, per step.
    Flat in pool size but for the O(√N) sub-keys."""
    c = config
    steps = c.loop_max_steps if steps is None else steps
    sizes = c.partition_sizes()

    def step_params(p: str) -> float:  # entry rows, plus what choosing them reads (product keys: the sub-keys)
        return c.partition_params_per_read(p) + c.partition_kind(p).scored_params(c, sizes[p])

    per_step = sum(step_params(p) for p in c.loop_phase_schedule) / c.loop_max_steps
    prelude = c.partition_params_per_read(c.ngram_prelude_partition) if c.ngram_prelude_partition is not None else 0
    return (steps * per_step + prelude) * bytes_per_param


__all__ = ["attention_macs", "block_macs", "forward_macs", "flops_per_token", "loop_step_macs", "pool_bytes_per_token",
           "read_macs"]
