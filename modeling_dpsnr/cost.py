"""Cost model: multiply-accumulates and bytes read per token, from the config alone.

Counted as nanoGPT / nanochat count (`estimate_flops`): the matrix products, one multiply-add per
weight touched, plus attention's score and value products over the context it sees; norms,
activations, softmaxes and top-k selections are left out (they are O(width), not O(width²)).
FLOPs = 2 × MACs for a forward pass; a training step (forward + backward) is taken as 3 × the
forward, the usual approximation.

Per token, DPSN-R spends
    controller   L × (attention projections + attention core + SwiGLU MLP)
    lm head      d × V
    loop         steps × (per-step cost of the step kind), where a step costs
                   query d·H·c, product-key scores H·(n1 + n2)·c/2 (exhaustive: H·N·c/2;
                   coordinate: the indexer MLP), entry reads H·k·entry_params (neuron: u·x and
                   the weighted v), the gate d², the halting head; the block step adds one
                   attention block (projections + core). A hashed n-gram read (hashed.py) costs
                   J·d for the weighted rows, 2·d² for W_k and W_v and d for the gate; its
                   hashing is O(J·C) integer work, not counted.
    prelude read the hashed n-gram read after a prelude block, when configured
so `steps` (the mean reasoning steps of a run) is the only quantity that comes from a measurement.
"""

from __future__ import annotations

from .configuration_dpsnr import DPSNRConfig
from .pool import product_key_sizes


def attention_macs(d: int, heads: int, kv_heads: int, head_dim: int, context: float) -> float:
    """One causal attention block per token: q/k/v/o projections + QKᵀ and AV over `context` keys."""
    projections = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    return projections + 2 * heads * head_dim * context


def block_macs(d: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, context: float) -> float:
    """One pre-norm decoder block with a SwiGLU MLP, per token."""
    return attention_macs(d, heads, kv_heads, head_dim, context) + 3 * d * intermediate


def retrieval_macs(config: DPSNRConfig, partition_entries: int) -> float:
    """Choosing the entries of one step in one partition, per token."""
    c = config
    if c.pool_retrieval == "coordinate":
        return c.hidden_size * c.indexer_hidden_size + c.indexer_hidden_size * 2 * c.pool_heads
    query = c.hidden_size * c.pool_heads * c.pool_key_dim
    if c.pool_retrieval == "exhaustive":
        return query + c.pool_heads * partition_entries * c.pool_key_dim / 2
    n1, n2 = product_key_sizes(partition_entries)
    return query + c.pool_heads * (n1 + n2) * c.pool_key_dim / 2


def read_macs(config: DPSNRConfig, partition: str) -> float:
    """One read of `partition` for one token: choosing the rows and combining them."""
    c = config
    if c.partition_retrieval(partition) == "hashed_ngram":
        d = c.hidden_size
        return c.ngram_slots * d + 2 * d * d + d  # weighted rows, W_k and W_v, the gate's dot product
    reads = c.partition_params_per_read(partition)  # u·x and the weighted v (neuron)
    return retrieval_macs(c, c.partition_sizes()[partition]) + reads


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
                    training: bool = False) -> float:
    """FLOPs per token: 2 × MACs, × 3 for a training step (forward + backward)."""
    return 2 * forward_macs(config, steps, context)["total"] * (3 if training else 1)


def pool_bytes_per_token(config: DPSNRConfig, steps: float | None = None, bytes_per_param: int = 4) -> float:
    """Pool bytes one token reads: its entry rows, and the sub-keys its queries score, per step.
    Flat in pool size but for the O(√N) sub-keys."""
    c = config
    steps = c.loop_max_steps if steps is None else steps
    sizes = c.partition_sizes()

    def step_params(p: str) -> float:  # entry rows, plus the sub-keys a product-key read scores
        keys = c.pool_heads * sum(product_key_sizes(sizes[p])) * c.pool_key_dim / 2 \
            if c.partition_retrieval(p) == "product_key" else 0.0
        return c.partition_params_per_read(p) + keys

    per_step = sum(step_params(p) for p in c.loop_phase_schedule) / c.loop_max_steps
    prelude = c.partition_params_per_read(c.ngram_prelude_partition) if c.ngram_prelude_partition is not None else 0
    return (steps * per_step + prelude) * bytes_per_param


__all__ = ["attention_macs", "block_macs", "forward_macs", "flops_per_token", "loop_step_macs", "pool_bytes_per_token",
           "read_macs"]
