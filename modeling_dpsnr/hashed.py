"""Hashed n-gram memory: a pool partition whose rows are chosen by the last few token ids.

After Engram ("conditional memory via scalable lookup", DeepSeek 2026): local, static patterns (names,
phrases, idioms) are looked up by hashing the n-gram that ends at a token instead of being recomputed
by attention and MLPs; the hidden state only decides how much of the looked-up vector to take.
Rows are known from the ids alone, before any layer runs, so a memory-mapped pool can be asked for
them at the start of the forward (`prepare_token_reads`).

Dimension letters used in shape comments:
    B, T  batch, tokens of this forward      n  tokens being read (B·T, or the still-running ones)
    C     context: the longest n-gram order (the token and the C − 1 before it)
    J     hash slots = len(ngram_orders) × ngram_heads
    N, d  rows of the partition, hidden size

    input_ids ─ +1, padding → 0 ─ after the previous C − 1 ids (a cache layer) ─▶ w (B·T, C), w[:, 0] the token
    slot j = (order o, head):  h_j = (c_j + Σ_{i<o} a_{j,i}·w_i  mod P)  mod p_j       P = 2^31 − 1
                               row_j = start_j + h_j        slot j owns rows [start_j, start_j + p_j), p_j prime
    m     = Σ_j s_j · v[row_j]                       (n, d)   s: learned slot weights
    α     = σ(⟨rms(x), rms(W_k m)⟩ / √d)             (n, 1)   context gate (Engram)
    read  = α · W_v m                                (n, d)

The hash is Carter & Wegman's multilinear universal family (1979): fixed integer arithmetic on int64
(products of two numbers < 2^31, so nothing overflows), constants drawn by SplitMix64 (Vigna) from a
CRC-32 of the partition name, never Python's `hash()`: every process computes the same rows.
Engram concatenates narrow per-slot vectors; here each slot reads a full row of width d (the pool's
storage holds (N, d) tables) and the rows are summed with one learned weight per slot, the multi-hash
embedding of Svenstrup et al. (2017). Engram's short causal convolution after the gate is not built.

With a KV cache, a new token's n-grams need the C − 1 ids before it. They are kept as one more cache
layer (after the controller's and the block step's layers) whose "keys" are the ids themselves, so
the cache reorders (beam search), crops and repeats them with everything else.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from transformers import initialization as init

from .cache import cache_update
from .configuration_dpsnr import DPSNRConfig
from .kinds import NGRAM_HASH_PRIME, stripe_bounds
from .norms import DPSNRRMSNorm
from .reads import EAGER_READ, EntryTables, PoolRead, Retrieval

PAD_ID = 0  # hashed in place of positions before the start (and padding): token ids are hashed as id + 1
_MASK64 = (1 << 64) - 1
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # Miller–Rabin bases: exact below 3.3·10^24


# ---------------------------------------------------------------------------- integer constants
def is_prime(n: int) -> bool:
    """Deterministic Miller–Rabin (exact for every n a pool can have)."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def slot_moduli(stripe_sizes: list[int]) -> list[int]:
    """One prime per slot, at most its stripe: the largest not taken by an earlier slot (distinct primes
    keep the heads' collisions independent), or the largest at all when the small stripe has run out."""
    used, out = set(), []
    for size in stripe_sizes:
        primes = (p for p in range(size, 1, -1) if is_prime(p))
        first = next(primes)
        p = first if first not in used else next((q for q in primes if q not in used), first)
        used.add(p)
        out.append(p)
    return out


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64 (Vigna 2015): (next state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def hash_constants(name: str, orders: list[int], heads: int, num_entries: int) -> dict[str, torch.Tensor]:
    """The fixed integers of partition `name`'s hash slots (slots ordered order-major, then head)."""
    slots = [o for o in orders for _ in range(heads)]
    context = max(orders)
    bounds = stripe_bounds(num_entries, len(slots))
    moduli = slot_moduli([hi - lo for lo, hi in bounds])
    state = zlib.crc32(name.encode("utf-8"))
    mult = torch.zeros(len(slots), context, dtype=torch.int64)
    offset = torch.zeros(len(slots), dtype=torch.int64)
    for j, order in enumerate(slots):
        for i in range(order):
            state, z = _splitmix64(state)
            mult[j, i] = 1 + z % (NGRAM_HASH_PRIME - 1)  # a ∈ [1, P): never 0, so every position counts
        state, z = _splitmix64(state)
        offset[j] = z % NGRAM_HASH_PRIME
    return {"slot_start": torch.tensor([lo for lo, _ in bounds], dtype=torch.int64),
            "slot_modulus": torch.tensor(moduli, dtype=torch.int64), "multipliers": mult, "offsets": offset}


# ---------------------------------------------------------------------------- the ids: windows of the last C tokens
def ngram_cache_layer(config: DPSNRConfig) -> int:
    """Cache layer holding the token ids: after the controller's blocks and the block step's layers."""
    return config.num_hidden_layers + (config.loop_max_steps if config.loop_step == "block" else 0)


def real_tokens(attention_mask: torch.Tensor, length: int, past) -> torch.Tensor:
    """(B, length) bool: which of this forward's tokens are real (not padding), from the 2-D mask a caller
    passes or the 4-D one `generate` builds for a static cache (B, 1, length, keys), where a padded token does
    not see itself: its diagonal entry, at key position past + t, is masked (False, or a large negative bias)."""
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:] != 0
    t = torch.arange(length, device=attention_mask.device)
    diagonal = attention_mask[:, 0, t, t + past]  # (B, length)
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0


def ngram_windows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache, cache_layer: int,
                  context: int) -> torch.Tensor:
    """(B, T) ids → (B·T, C) windows: column i holds the token i positions back (+1), 0 before the start.

    Padding (attention mask 0) hashes as the pad id too, so a left-padded row reads what it reads alone.
    With a cache, this forward's ids are appended to `cache_layer` and the earlier ones read back.
    """
    B, T = input_ids.shape
    layers = getattr(cache, "layers", None)
    stored = layers[cache_layer].get_seq_length() if layers is not None and len(layers) > cache_layer else 0
    ids = input_ids.long() + 1  # (B, T): 0 is the pad id
    if attention_mask is not None:
        ids = ids.masked_fill(~real_tokens(attention_mask, T, stored), PAD_ID)
    if cache is None:
        history = ids[:, -(T + context - 1):]  # (B, ≤ T + C − 1)
        history = nn.functional.pad(history, (T + context - 1 - history.shape[1], 0), value=PAD_ID)  # (B, T + C − 1)
    else:
        seen = cache.get_seq_length()
        # A static cache counts in tensors (its lengths live on the device): its ids need no such check.
        if not torch.is_tensor(seen) and not torch.is_tensor(stored) and seen != stored:
            raise ValueError(
                f"the cache holds {seen} earlier tokens but the ids of {stored} (cache layer {cache_layer}): hashed "
                "n-gram reads need the ids of earlier tokens, which this model's own forward stores in its cache."
            )
        # positions of the last T + C − 1 ids (the history), before the update moves a static layer's count
        pos = torch.arange(T + context - 1, device=ids.device) + (stored - (context - 1))
        full = cache_update(cache, ids.view(B, 1, T, 1), ids.new_zeros(B, 1, T, 0), cache_layer)[0].view(B, -1)
        # (B, stored + T), or a static layer's whole length, filled up to stored + T
        history = full.gather(1, pos.clamp(min=0).expand(B, -1)).masked_fill((pos < 0).expand(B, -1), PAD_ID)
    return history.unfold(1, context, 1).flip(-1).reshape(B * T, context)  # (B·T, C), the token first


def prepare_token_reads(pool, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cache,
                        cache_layer: int) -> dict[str, torch.Tensor] | None:
    """Hash every token's rows for each hashed partition of `pool` and ask the kernel for their pages
    (memory-mapped pools: `pool_files.Prefetcher`). Called once per forward before any layer runs.
    Returns name → (B·T, J) rows, or None when the pool has no hashed partition."""
    hashed = {name: part for name, part in pool.partitions.items() if getattr(part, "reads_tokens", False)}
    if not hashed:
        return None
    if input_ids is None:
        raise ValueError("hashed_ngram partitions hash the token ids: call the model with input_ids, not inputs_embeds.")
    context = max(part.retriever.context for part in hashed.values())
    windows = ngram_windows(input_ids, attention_mask, cache, cache_layer, context)  # (B·T, C)
    reads = {}
    for name, part in hashed.items():
        reads[name] = part.retriever(windows)  # (B·T, J)
        if part.prefetcher is not None:
            part.prefetcher.request(reads[name])
    return reads


# ---------------------------------------------------------------------------- modules
class NgramHashRetriever(nn.Module):
    """Windows of ids → one row per hash slot. Its integers are non-persistent buffers: they follow
    from the config and the partition name, and `init_weights_` rebuilds them after a load."""

    def __init__(self, config: DPSNRConfig, name: str, num_entries: int):
        super().__init__()
        self.name = name
        self.num_entries = num_entries
        self.orders = list(config.ngram_orders)
        self.heads = config.ngram_heads
        self.slots = len(self.orders) * self.heads
        self.context = max(self.orders)
        for key, value in hash_constants(name, self.orders, self.heads, num_entries).items():
            self.register_buffer(key, value, persistent=False)

    @torch.no_grad()
    def init_weights_(self, std: float) -> None:
        for key, value in hash_constants(self.name, self.orders, self.heads, self.num_entries).items():
            init.copy_(getattr(self, key), value)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (n, C) int64 → rows (n, J) int64 within the partition."""
        terms = windows[:, None, : self.context] * self.multipliers % NGRAM_HASH_PRIME  # (n, J, C), each < 2^31
        h = (terms.sum(-1) + self.offsets) % NGRAM_HASH_PRIME  # (n, J)
        return self.slot_start + h % self.slot_modulus  # (n, J)


class HashedNgramPartition(EntryTables):
    """A pool partition read by hashed n-grams, gated by the state it is read for: one (N, d) value table
    `v` whatever `pool_entry` says (kinds.HashedNgrams), read through its own projections and gate."""

    reads_tokens = True  # ParameterPool hands it the rows hashed up front

    def __init__(self, config: DPSNRConfig, name: str, num_entries: int):
        d = config.hidden_size
        super().__init__(name, num_entries, d, config.partition_tables(name), config.pool_init_std)
        self.prefetcher = None  # set by storage.load_pool_into for a memory-mapped pool
        self.retriever = NgramHashRetriever(config, name, num_entries)
        self.slot_weight = nn.Parameter(torch.empty(self.retriever.slots))  # (J,)
        self.key_proj = nn.Linear(d, d, bias=False)  # W_k
        self.value_proj = nn.Linear(d, d, bias=False)  # W_v
        self.state_norm = DPSNRRMSNorm(d, config.rms_norm_eps)
        self.key_norm = DPSNRRMSNorm(d, config.rms_norm_eps)

    def attach_prefetcher(self, prefetcher) -> None:
        """Memory-mapped tables: the rows are known from the ids, so they are asked for before any layer
        runs (`prepare_token_reads`)."""
        self.prefetcher = prefetcher

    @torch.no_grad()
    def init_weights_(self, std: float) -> None:
        super().init_weights_(std)
        init.constant_(self.slot_weight, self.retriever.slots ** -0.5)  # m keeps the rows' scale

    def forward(
        self,
        query_input: torch.Tensor | None,  # unused: the rows come from the tokens, not from a query
        x: torch.Tensor,  # (n, d) the normalised state the read is for
        read: PoolRead = EAGER_READ,
        token_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,  # (n,) which of the forward's B·T tokens these are; None: all, in order
    ) -> tuple[torch.Tensor, Retrieval]:
        if read.token_rows is None:
            raise ValueError(f"partition {self.name!r} is hashed_ngram: its rows come from the token ids, "
                             "which only the model's forward (with input_ids) provides.")
        indices = read.token_rows[self.name]  # (B·T, J), hashed by `prepare_token_reads`
        n = x.shape[0]
        idx = (indices if rows is None else indices[rows]).to(self.v.device)  # (n, J)
        coef = self.slot_weight.expand(n, -1)  # (n, J)
        m = self.row_sum(self.v, idx, coef, read).to(x.device, x.dtype)  # (n, d)
        k = self.key_norm(self.key_proj(m))  # (n, d)
        alpha = torch.sigmoid((self.state_norm(x) * k).sum(-1, keepdim=True) / math.sqrt(x.shape[-1]))  # (n, 1)
        return alpha * self.value_proj(m), Retrieval(indices=idx.unsqueeze(-1), weights=coef.unsqueeze(-1))


class NgramPreludeRead(nn.Module):
    """A hashed partition read once in the prelude, after block `ngram_prelude_layer`: h + read(norm(h)).
    Engram reads its memory early in the stack, where local patterns are cheapest to hand over."""

    def __init__(self, config: DPSNRConfig, pool):
        super().__init__()
        self.partition = config.ngram_prelude_partition
        self.layer = config.ngram_prelude_layer
        self.rows_per_token = config.partition_rows_per_read(self.partition)
        self.params_per_token = config.partition_params_per_read(self.partition)
        self.norm = DPSNRRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pool = [pool]  # a reference, not a submodule: the loop owns the pool

    def forward(self, hidden_states: torch.Tensor, read: PoolRead) -> torch.Tensor:
        B, T, d = hidden_states.shape
        x = self.norm(hidden_states).reshape(B * T, d)  # (B·T, d)
        return hidden_states + self.pool[0](self.partition, x, x, read=read).view(B, T, d)


__all__ = ["HashedNgramPartition", "NgramHashRetriever", "NgramPreludeRead", "hash_constants", "ngram_cache_layer",
           "ngram_windows", "prepare_token_reads", "slot_moduli"]
