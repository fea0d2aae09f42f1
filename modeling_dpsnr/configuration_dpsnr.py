"""DPSN-R configuration.

Standard decoder fields keep their transformers names (`hidden_size`, `num_hidden_layers`, ...);
the new parts are prefixed: `pool_*` (the parameter pool and its retrieval), `loop_*` (the
adaptive reasoning loop) and `indexer_*` (the coordinate indexer). Every invariant is checked
when the config is built, and a violation raises `ValueError` naming the field.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig
from transformers.utils import logging

from .execution import LEGACY_CONFIG_KEYS
from .kinds import ENTRY_KINDS, RETRIEVAL_KINDS, EntryKind, RetrievalKind
from .presets import preset_kwargs
from .validation import check_choice, check_nonneg_int, check_positive_float, check_positive_int, check_rate, is_int


logger = logging.get_logger(__name__)

# pool_retrieval and pool_entry name kinds of kinds.py: RETRIEVAL_KINDS, ENTRY_KINDS (their checks, cost, tables)
POOL_QUERY_NORMS = ("rms", "layer", "running")  # norms.QUERY_NORMS
POOL_KEY_NORMS = ("none", "unit")
POOL_BALANCES = ("none", "bias")
POOL_QUERY_INPUTS = ("state+token", "state")
LOOP_HALTINGS = ("act", "fixed", "threshold", "exits")  # halting.POLICIES
LEGACY_LOOP_HALTINGS = {"none": "fixed"}  # names saved configs may carry
LOOP_STEPS = ("token", "block")  # reasoning.STEP_KINDS
DEFAULT_NGRAM_ORDERS = [2, 3]  # Engram (DeepSeek 2026) reads 2- and 3-grams

# Default partitions and the share of the reasoning steps each one gets when the schedule is
# derived (design §2: for 8 steps, knowledge x2, reasoning x4, grammar x2).
DEFAULT_PARTITIONS = {"knowledge": 0.7, "reasoning": 0.2, "grammar": 0.1}
DEFAULT_STEP_SHARES = {"knowledge": 0.25, "reasoning": 0.5, "grammar": 0.25}


def derive_phase_schedule(partitions: list[str], max_steps: int) -> list[str]:
    """Lay out `max_steps` steps over `partitions`, in partition order.

    Each partition gets a share of the steps (the design's 2/4/2 split for the default
    partitions, equal shares otherwise), rounded by largest remainder (ties go to the earlier
    partition). With fewer steps than partitions some partitions are simply not read.
    """
    known = all(p in DEFAULT_STEP_SHARES for p in partitions)
    shares = [DEFAULT_STEP_SHARES[p] if known else 1.0 for p in partitions]
    total = sum(shares)
    exact = [s / total * max_steps for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(partitions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: max_steps - sum(counts)]:
        counts[i] += 1
    return [p for p, c in zip(partitions, counts) for _ in range(c)]


def derive_capacity(max_steps: int, min_steps: int = 1) -> list[float]:
    """Default share of tokens reaching each step for threshold routing: 1.0 through min_steps,
    then 0.6 falling linearly to 0.4 (4 steps: 1, 0.6, 0.5, 0.4; mean 2.5)."""
    rest = max_steps - min_steps
    tail = [0.6 - 0.2 * i / max(1, rest - 1) for i in range(rest)]
    return [1.0] * min_steps + [round(c, 6) for c in tail]


class DPSNRConfig(PreTrainedConfig):
    r"""Configuration of a DPSN-R model: a transformer controller split into prelude and coda
    blocks, with an adaptive reasoning loop between them that reads a large parameter pool.

    Controller (standard transformers names):
        vocab_size (`int`, 50257): vocabulary size of the tied embedding / LM head.
        hidden_size (`int`, 512): width `d` of the controller and of every pool entry.
        intermediate_size (`int`, 1408): width of the SwiGLU MLP in each block.
        num_hidden_layers (`int`, 4): number of controller blocks, prelude and coda together.
        num_prelude_layers (`int`, 2): blocks before the reasoning loop; the remaining
            `num_hidden_layers - num_prelude_layers` blocks (the coda) follow it, so coda attention
            mixes retrieved knowledge across positions. 0 is allowed (loop on the embeddings).
        num_attention_heads (`int`, 8), num_key_value_heads (`int`, None → same; GQA if fewer).
        head_dim (`int`, None → hidden_size // num_attention_heads, written back at build time).
        hidden_act (`str`, "silu"): activation of the SwiGLU gate.
        max_position_embeddings (`int`, 2048): longest context the RoPE tables are built for.
        rope_theta (`float`, 10000.0): RoPE base.
        rope_parameters (`dict`, None): transformers' RoPE dict (`rope_type`, ...); filled from
            `rope_theta` when absent, so scaled RoPE variants of transformers can be used.
        rms_norm_eps (`float`, 1e-6), initializer_range (`float`, 0.02).
        attention_bias (`bool`, False), attention_dropout (`float`, 0.0).
        tie_word_embeddings (`bool`, True): the LM head shares the embedding matrix.
        use_cache (`bool`, True), pad/bos/eos_token_id: as in every transformers config.

    Pool:
        pool_size (`int`, 100000): number of entries over all partitions.
        pool_partitions (`dict[str, float]`, knowledge 0.7 / reasoning 0.2 / grammar 0.1): name →
            fraction of `pool_size`; fractions are positive and sum to 1. Each partition has its
            own keys and query projection. One partition is an unpartitioned pool.
        pool_retrieval (`str`, "product_key"): "product_key" (exact top-k at O(√N) cost per head),
            "exhaustive" (scores every entry with the same keys; the reference for tests),
            "coordinate" (a learned indexer reads a contiguous window; see `indexer_*`) or
            "hashed_ngram" (rows chosen by hashing the last tokens, gated by the state; see `ngram_*`).
            Each kind is a descriptor in kinds.py (its config checks, cost and tables).
        pool_partition_retrieval (`dict[str, str]`, None): partition name → retrieval kind, for the
            partitions whose kind differs from `pool_retrieval` (one model can mix kinds, e.g.
            {"grammar": "hashed_ngram"} beside product-key partitions).
        pool_entry (`str`, "neuron"): "neuron" stores (u, v) per entry and contributes
            `act(u·x)·v` (PEER single-neuron experts); "value" stores v and contributes v.
        pool_heads (`int`, 4): independent retrieval heads per step; their reads are summed.
        pool_topk (`int`, 8): entries read per head per step.
        pool_key_dim (`int`, 128): query / product-key width per head; even, split in two halves.
        pool_activation (`str`, "gelu"): activation of neuron entries.
        pool_query_input (`str`, "state+token"): what the retriever sees at each step. "state" is
            norm(h) + step embedding, the design's formula. "state+token" adds the normalised input
            embedding of the token itself. With "state" the hidden states collapse across tokens in
            the early unigram phase, every token selects the same entries and halting falls to one
            step. `dpsnr compare --jobs 2` (micro, 122,880 tokens; eval/results/compare.json),
            TinyStories: "state" reaches held-out ppl 242.8 with 1.0 mean steps and 0.46 % of
            knowledge rows read; "state+token" 86.8, 4.0 steps, 4.3 % (a dense Llama of the
            controller's size: 191.0).
        pool_query_norm (`str`, "rms"): normalisation of each head's query before scoring: "rms",
            "layer", or "running" (each dimension standardised with running statistics of earlier
            training batches: BatchNorm's effect on usage without mixing the positions of a batch).
        pool_query_norm_momentum (`float`, 0.05): EMA rate of the "running" query statistics.
        pool_key_norm (`str`, "none"): "unit" scores queries against unit-norm sub-keys (qk-norm).
        pool_init_std (`float`, None → initializer_range): std of the entry tables at init.
        pool_balance (`str`, "none"): "bias" adds a per-sub-key selection bias that is nudged
            towards uniform usage during training without an auxiliary loss (the loss-free
            balancing of DeepSeek-V3, applied to product sub-keys); the bias only affects which
            entries are selected, not their weights.
        pool_balance_rate (`float`, 1e-3): step size of the balancing bias update.
        pool_selection_noise (`float`, 0.0): std of Gaussian noise added to selection scores in
            training mode (exploration); weights use the noiseless scores.

    Reasoning loop:
        loop_max_steps (`int`, 8): most reasoning steps per token (the last step always halts).
        loop_min_steps (`int`, 1): fewest steps; the halting head is not consulted before it.
        loop_phase_schedule (`list[str]`, None → derived): the partition read at each step,
            length `loop_max_steps`, every name a key of `pool_partitions`. Derived: the steps shared
            over the partitions in order (the design's 2/4/2 for its three), leaving out
            `ngram_prelude_partition` (read in the prelude; name it here to read it in the loop too).
        loop_step (`str`, "token"): what one step computes (reasoning.py). "token": a gated pool read
            on the token's own state (no attention, no cache). "block": a shared transformer block
            whose MLP is the pool read, so attention at each depth sees the sequence (recurrent
            depth; halted tokens are seen at their deepest state).
        loop_halting (`str`, "act"): the halting policy (halting.py). "act": Graves (2016) adaptive
            computation time with a ponder cost; "fixed": every token runs `loop_max_steps` and
            keeps its last state ("none" in older configs); "threshold": routed capacity, a router
            per step lets the share `loop_capacity` of tokens continue through a causal EMA threshold;
            "exits": trained exits (Ouro, Zhu et al. 2025): every step is an exit with a learned exit
            probability, trained on the expected loss over the exits with an entropy bonus (weight
            `loop_ponder_weight`), every token running every step in training; at inference a token
            stops at the first step where its exit distribution's CDF reaches `loop_exit_threshold`.
        loop_halt_epsilon (`float`, 0.01): a token halts once its cumulative halting
            probability reaches `1 - loop_halt_epsilon`.
        loop_ponder_weight (`float`, 0.01): weight of the ponder cost `N + R` added to the loss
            ("act"), or of the exit distribution's negative entropy ("exits"; Ouro's β).
            Measured on micro at 122,880 tokens (eval/results/compare_ponder.json): 0.01-0.1 leave
            every token at the maximum; 0.3 halts selectively, at a perplexity above a fixed loop
            of as many steps.
        loop_halt_bias_init (`float`, -2.2): initial halting bias; σ(-2.2) ≈ 0.1 so that an
            untrained model runs most steps and every partition receives gradient.
        loop_exit_threshold (`float`, 0.5): with `loop_halting="exits"`, the CDF of the exit distribution
            at which a token stops at inference (Ouro's q): lower stops earlier.
        loop_capacity (`list[float]`, None → derived): with `loop_halting="threshold"`, the share of
            tokens that reach each step: non-increasing, 1.0 for the first `loop_min_steps` steps;
            the mean number of steps is its sum. Derived: 1, then 0.6 falling linearly to 0.4
            (4 steps: 1, 0.6, 0.5, 0.4 → 2.5 steps on average).
        loop_threshold_momentum (`float`, 0.2): EMA rate of the inference thresholds of "threshold" routing
            (each training batch routes at its own quantile and folds it into the EMA).

    Hashed n-gram memory (partitions of kind "hashed_ngram"; hashed.py, after Engram, DeepSeek 2026):
        ngram_orders (`list[int]`, [2, 3]): n-gram lengths hashed at each position (the token and the
            n − 1 before it; positions before the start hash a fixed pad id).
        ngram_heads (`int`, 4): hash functions per order; each owns a stripe of the partition whose
            size is a prime, so a collision in one head is rarely repeated in the others. A read
            takes len(ngram_orders) × ngram_heads rows.
        A hashed partition stores values only (its `v` table, whatever `pool_entry` says) and reads them
        through its own key / value projections and context gate.
        ngram_prelude_partition (`str`, None): a hashed_ngram partition that is also read in the
            prelude, after block `ngram_prelude_layer`, as Engram reads its memory early in the stack.
        ngram_prelude_layer (`int`, 1): prelude blocks before that read (0: on the embeddings);
            at most `num_prelude_layers`.

    Coordinate indexer (used when `pool_retrieval="coordinate"`):
        indexer_hidden_size (`int`, 256): hidden width of the indexer MLP.
        indexer_window (`int`, 16): rows read per head per step (K), a contiguous window.
        indexer_min_sigma (`float`, 0.5): smallest Gaussian width, in rows.
        indexer_balance (`str`, "quantile"): "quantile" warps each head's predicted position through
            the running CDF of the positions it predicts (histogram equalisation, no auxiliary loss),
            so windows spread over the head's stripe instead of collapsing onto a few regions; "none".
        indexer_balance_bins (`int`, 128): histogram bins per head of the quantile warp.
        indexer_balance_momentum (`float`, 0.01): weight of each training batch in the running histogram.
    """

    model_type = "dpsnr"
    keys_to_ignore_at_inference = ["past_key_values"]

    # controller
    vocab_size: int = 50257
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 4
    num_prelude_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # pool
    pool_size: int = 100_000
    pool_partitions: dict[str, float] | None = None
    pool_retrieval: str = "product_key"
    pool_entry: str = "neuron"
    pool_heads: int = 4
    pool_topk: int = 8
    pool_key_dim: int = 128
    pool_activation: str = "gelu"
    pool_query_input: str = "state+token"
    pool_query_norm: str = "rms"
    pool_query_norm_momentum: float = 0.05
    pool_key_norm: str = "none"
    pool_init_std: float | None = None
    pool_balance: str = "none"
    pool_balance_rate: float = 1e-3
    pool_selection_noise: float = 0.0
    pool_partition_retrieval: dict[str, str] | None = None
    # hashed n-gram memory
    ngram_orders: list[int] | None = None
    ngram_heads: int = 4
    ngram_prelude_partition: str | None = None
    ngram_prelude_layer: int = 1
    # reasoning loop
    loop_max_steps: int = 8
    loop_min_steps: int = 1
    loop_phase_schedule: list[str] | None = None
    loop_step: str = "token"
    loop_halting: str = "act"
    loop_halt_epsilon: float = 0.01
    loop_ponder_weight: float = 0.01
    loop_halt_bias_init: float = -2.2
    loop_exit_threshold: float = 0.5
    loop_capacity: list[float] | None = None
    loop_threshold_momentum: float = 0.2
    # coordinate indexer
    indexer_hidden_size: int = 256
    indexer_window: int = 16
    indexer_min_sigma: float = 0.5
    indexer_balance: str = "quantile"
    indexer_balance_bins: int = 128
    indexer_balance_momentum: float = 0.01

    def __post_init__(self, **kwargs):
        for key in LEGACY_CONFIG_KEYS:  # runtime settings that configs saved before ExecutionPlan carried
            if key in kwargs:
                logger.warning_once(
                    f"DPSNRConfig: `{key}` is a runtime setting, not architecture, and is ignored here; "
                    f"use `model.set_execution({key}=...)`."
                )
                kwargs.pop(key)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.pool_partitions = dict(DEFAULT_PARTITIONS if self.pool_partitions is None else self.pool_partitions)
        if self.pool_partition_retrieval is not None and isinstance(self.pool_partition_retrieval, dict):
            self.pool_partition_retrieval = dict(self.pool_partition_retrieval)
        if self.ngram_orders is None:
            self.ngram_orders = list(DEFAULT_NGRAM_ORDERS)
        elif isinstance(self.ngram_orders, (list, tuple)):
            self.ngram_orders = list(self.ngram_orders)
        if self.loop_phase_schedule is not None:
            self.loop_phase_schedule = list(self.loop_phase_schedule)
        self.loop_halting = LEGACY_LOOP_HALTINGS.get(self.loop_halting, self.loop_halting)
        if self.loop_capacity is not None:
            self.loop_capacity = [float(c) for c in self.loop_capacity]
        elif is_int(self.loop_max_steps) and is_int(self.loop_min_steps) and self.loop_max_steps > 0:
            self.loop_capacity = derive_capacity(self.loop_max_steps, self.loop_min_steps)
        self._check_controller()
        if self.head_dim is None:  # explicit, as transformers' RoPE initialisers (yarn, dynamic, ...) read it
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._check_pool()
        if self.loop_phase_schedule is None and is_int(self.loop_max_steps) and self.loop_max_steps > 0:
            # A partition the prelude reads (ngram_prelude_partition) is not laid into the loop unless the
            # schedule names it: the loop's steps go to the others (all of them if it is the only one).
            loop_parts = [p for p in self.pool_partitions if p != self.ngram_prelude_partition] or list(self.pool_partitions)
            self.loop_phase_schedule = derive_phase_schedule(loop_parts, self.loop_max_steps)
        self._check_loop()
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ derived sizes
    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_coda_layers(self) -> int:
        return self.num_hidden_layers - self.num_prelude_layers

    def partition_sizes(self) -> dict[str, int]:
        """Entries per partition: floor of fraction × pool_size; the rounding remainder goes to the
        largest partition (ties by name), so sizes do not depend on dict order (JSON sorts keys)."""
        sizes = {name: int(math.floor(frac * self.pool_size)) for name, frac in self.pool_partitions.items()}
        largest = min(self.pool_partitions, key=lambda n: (-self.pool_partitions[n], n))
        sizes[largest] += self.pool_size - sum(sizes.values())
        return sizes

    # per partition: one model can mix retrieval kinds (`pool_partition_retrieval`); kinds.py describes each
    def partition_retrieval(self, name: str) -> str:
        """The retrieval kind of partition `name`."""
        return (self.pool_partition_retrieval or {}).get(name, self.pool_retrieval)

    def partition_kind(self, name: str) -> RetrievalKind:
        """The descriptor of partition `name`'s retrieval kind (checks, cost, tables)."""
        return RETRIEVAL_KINDS[self.partition_retrieval(name)]

    @property
    def retrieval_kind(self) -> RetrievalKind:
        """The descriptor of `pool_retrieval`, the kind of every partition not named in `pool_partition_retrieval`."""
        return RETRIEVAL_KINDS[self.pool_retrieval]

    @property
    def entry_kind(self) -> EntryKind:
        """The descriptor of `pool_entry`."""
        return ENTRY_KINDS[self.pool_entry]

    @property
    def pool_reads_per_head(self) -> int:
        """Entries each head reads per step with `pool_retrieval`: top-k, or the coordinate window K."""
        return self.retrieval_kind.reads_per_head(self)

    @property
    def pool_entry_params(self) -> int:
        """Parameters stored per pool entry (u and v for neurons, v for values)."""
        return self.entry_kind.params_per_row(self.hidden_size)

    def partition_tables(self, name: str) -> tuple[str, ...]:
        """The entry tables of partition `name` (hashed n-gram partitions store values only)."""
        return self.partition_kind(name).tables(self.entry_kind)

    @property
    def ngram_slots(self) -> int:
        """Rows one hashed n-gram read takes: one per order and hash head."""
        return len(self.ngram_orders) * self.ngram_heads

    def partition_rows_per_read(self, name: str) -> int:
        """Rows one read of partition `name` takes per token."""
        return self.partition_kind(name).rows_per_read(self)

    def partition_params_per_read(self, name: str) -> int:
        """Entry parameters one read of partition `name` touches per token."""
        return self.partition_rows_per_read(name) * len(self.partition_tables(name)) * self.hidden_size

    # ------------------------------------------------------------------ validation
    def _check_controller(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        ):
            check_positive_int(name, getattr(self, name))
        check_nonneg_int("num_prelude_layers", self.num_prelude_layers)
        if self.num_prelude_layers > self.num_hidden_layers:
            raise ValueError(
                f"num_prelude_layers ({self.num_prelude_layers}) must be at most num_hidden_layers "
                f"({self.num_hidden_layers}): the coda holds the remaining blocks."
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly."
            )
        if self.head_dim is not None:
            check_positive_int("head_dim", self.head_dim)
        if self.attention_head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.attention_head_dim}) must be even for rotary embeddings.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            ids = getattr(self, name)
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and (not is_int(i) or not 0 <= i < self.vocab_size):
                    raise ValueError(f"{name} ({i!r}) must be a token id in [0, vocab_size={self.vocab_size}).")
        check_positive_float("rope_theta", self.rope_theta)
        check_positive_float("rms_norm_eps", self.rms_norm_eps)
        check_positive_float("initializer_range", self.initializer_range)
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}.")
        from transformers.activations import ACT2FN

        for name in ("hidden_act", "pool_activation"):
            if getattr(self, name) not in ACT2FN:
                raise ValueError(f"{name} must be one of transformers' activations, got {getattr(self, name)!r}.")

    def _check_pool(self) -> None:
        check_positive_int("pool_size", self.pool_size)
        check_choice("pool_retrieval", self.pool_retrieval, RETRIEVAL_KINDS)
        check_choice("pool_entry", self.pool_entry, ENTRY_KINDS)
        check_choice("pool_query_norm", self.pool_query_norm, POOL_QUERY_NORMS)
        check_choice("pool_key_norm", self.pool_key_norm, POOL_KEY_NORMS)
        check_rate("pool_query_norm_momentum", self.pool_query_norm_momentum)
        check_choice("pool_query_input", self.pool_query_input, POOL_QUERY_INPUTS)
        check_choice("pool_balance", self.pool_balance, POOL_BALANCES)
        check_positive_int("pool_heads", self.pool_heads)
        check_positive_int("pool_topk", self.pool_topk)
        check_positive_int("pool_key_dim", self.pool_key_dim)
        if self.pool_key_dim % 2 != 0:
            raise ValueError(f"pool_key_dim ({self.pool_key_dim}) must be even: product keys split it in two halves.")
        if self.pool_init_std is not None:
            check_positive_float("pool_init_std", self.pool_init_std)
        check_positive_float("pool_balance_rate", self.pool_balance_rate)
        if not (isinstance(self.pool_selection_noise, (int, float)) and self.pool_selection_noise >= 0):
            raise ValueError(f"pool_selection_noise must be ≥ 0, got {self.pool_selection_noise!r}.")

        parts = self.pool_partitions
        if not isinstance(parts, dict) or not parts:
            raise ValueError(f"pool_partitions must be a non-empty dict name → fraction, got {parts!r}.")
        for name, frac in parts.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"pool_partitions names must be identifiers, got {name!r}.")
            if not isinstance(frac, (int, float)) or not 0.0 < frac <= 1.0:
                raise ValueError(f"pool_partitions[{name!r}] must be a fraction in (0, 1], got {frac!r}.")
        if abs(sum(parts.values()) - 1.0) > 1e-6:
            raise ValueError(
                f"pool_partitions fractions must sum to 1, got {sum(parts.values()):.6g} for {parts}."
            )
        kinds = self.pool_partition_retrieval
        if kinds is not None:
            if not isinstance(kinds, dict):
                raise ValueError(f"pool_partition_retrieval must be a dict partition name → retrieval kind, got {kinds!r}.")
            unknown = sorted(set(kinds) - set(parts))
            if unknown:
                raise ValueError(f"pool_partition_retrieval names unknown partition(s) {unknown}; known: {list(parts)}.")
            for name, kind in kinds.items():
                check_choice(f"pool_partition_retrieval[{name!r}]", kind, RETRIEVAL_KINDS)
        # Each kind checks what it needs of the config (kinds.py), given its partitions (possibly none).
        sizes = self.partition_sizes()
        for name, kind in RETRIEVAL_KINDS.items():
            kind.check(self, {p: n for p, n in sizes.items() if self.partition_retrieval(p) == name})
        if self.pool_balance == "bias" and not any(self.partition_kind(p).sub_keys for p in parts):
            raise ValueError("pool_balance='bias' applies to product-key sub-keys; use it with pool_retrieval='product_key'.")

    def _check_loop(self) -> None:
        check_positive_int("loop_max_steps", self.loop_max_steps)
        check_positive_int("loop_min_steps", self.loop_min_steps)
        if self.loop_min_steps > self.loop_max_steps:
            raise ValueError(
                f"loop_min_steps ({self.loop_min_steps}) must be ≤ loop_max_steps ({self.loop_max_steps})."
            )
        check_choice("loop_halting", self.loop_halting, LOOP_HALTINGS)
        check_choice("loop_step", self.loop_step, LOOP_STEPS)
        cap = self.loop_capacity
        if not isinstance(cap, list) or len(cap) != self.loop_max_steps:
            raise ValueError(f"loop_capacity must list one share per step ({self.loop_max_steps} numbers), got {cap!r}.")
        if any(not 0.0 < c <= 1.0 for c in cap) or any(b > a + 1e-9 for a, b in zip(cap, cap[1:])):
            raise ValueError(f"loop_capacity must be non-increasing shares in (0, 1], got {cap}.")
        if any(c != 1.0 for c in cap[: self.loop_min_steps]):
            raise ValueError(f"loop_capacity must be 1.0 for the first loop_min_steps ({self.loop_min_steps}) steps, got {cap}.")
        check_rate("loop_threshold_momentum", self.loop_threshold_momentum)
        if not 0.0 < self.loop_halt_epsilon < 1.0:
            raise ValueError(f"loop_halt_epsilon must be in (0, 1), got {self.loop_halt_epsilon}.")
        if not (isinstance(self.loop_exit_threshold, (int, float)) and 0.0 < self.loop_exit_threshold < 1.0):
            raise ValueError(f"loop_exit_threshold must be in (0, 1), got {self.loop_exit_threshold!r}.")
        if not (isinstance(self.loop_ponder_weight, (int, float)) and self.loop_ponder_weight >= 0):
            raise ValueError(f"loop_ponder_weight must be ≥ 0, got {self.loop_ponder_weight!r}.")
        if not isinstance(self.loop_halt_bias_init, (int, float)) or not math.isfinite(self.loop_halt_bias_init):
            raise ValueError(f"loop_halt_bias_init must be a finite number, got {self.loop_halt_bias_init!r}.")
        schedule = self.loop_phase_schedule
        if not isinstance(schedule, list) or len(schedule) != self.loop_max_steps:
            raise ValueError(
                f"loop_phase_schedule must list one partition per step ({self.loop_max_steps} names), got {schedule!r}."
            )
        unknown = sorted({p for p in schedule if p not in self.pool_partitions})
        if unknown:
            raise ValueError(
                f"loop_phase_schedule names unknown partition(s) {unknown}; known: {list(self.pool_partitions)}."
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DPSNRConfig":
        """Build a named preset (see `presets.py`), with any field overridden."""
        kwargs = preset_kwargs(name)
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["DPSNRConfig", "derive_capacity", "derive_phase_schedule"]
