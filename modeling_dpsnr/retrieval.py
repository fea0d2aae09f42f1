"""Retrieval-based partitions: a retriever chooses k rows per head and weights them, and the partition
reads those rows with its entry kind. Retrieval kinds product_key, exhaustive and coordinate
(kinds.py holds their checks, cost and tables; `RETRIEVERS` maps them onto the modules below).

Dimension letters used in shape comments:
    n  tokens being processed (B·T flattened, or only the still-running ones)
    d  hidden size (= entry width)
    H  retrieval heads              k  entries per head per step (pool_topk; coordinate: the window K)
    c  query width per head (pool_key_dim), split into halves of c/2
    N  entries in a partition       n1, n2  product sub-key table sizes (n1·n2 ≥ N)

One reasoning step on one product-key partition:

    x ─ query ─ norm ─▶ q (n,H,c) ─ split ─▶ q1, q2 (n,H,c/2)
                               scores s1 = q1·K1ᵀ (n,H,n1),  s2 = q2·K2ᵀ (n,H,n2)
                               top-k of each half, k² candidate sums, top-k again
                         ─▶ idx (n,H,k), w = softmax(scores) (n,H,k)
    read (reads.py, by entry kind):  Σ_h Σ_i w_i · act(u_i·x) · v_i     ("neuron", PEER; He 2024)
                                  or Σ_h Σ_i w_i · v_i                   ("value", Lample et al. 2019)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from .configuration_dpsnr import DPSNRConfig
from .execution import is_tracing
from .kinds import product_key_sizes, stripe_bounds
from .norms import QUERY_NORMS
from .reads import EAGER_READ, ENTRY_READS, EntryTables, PoolRead, Retrieval


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, dim=-1)` (sorted, largest first), the same values and entries, in two cheap passes
    where torch's CPU kernel is slow: rows of 128-511 scores with k > m/64, where it runs an
    nth_element per row (micro's 256 sub-keys at k 8, the forward's largest single cost). Pass 1 takes the
    max of each of 32 strided groups (element i·32 + g is in group g) and the k groups with the largest
    maxima; the k largest scores lie in those groups (any score outside them is beaten by k group
    maxima), so pass 2 is a top-k over their k·m/32 scores. tests/test_pool.py checks it against topk."""
    m = scores.shape[-1]
    rows = scores.numel() // max(m, 1)
    groups = 32
    if scores.device.type != "cpu" or not 128 <= m < 64 * k or m % groups or k > groups or rows < 256:
        return scores.topk(k, dim=-1)
    flat = scores.reshape(rows, m)
    best_groups = flat.view(rows, m // groups, groups).amax(1).topk(k, dim=-1).indices  # (rows, k)
    cand = (best_groups.unsqueeze(1) + groups * torch.arange(m // groups, device=scores.device).view(1, -1, 1)).reshape(rows, -1)
    values, pos = flat.gather(1, cand).topk(k, dim=-1)
    return values.view(*scores.shape[:-1], k), cand.gather(1, pos).view(*scores.shape[:-1], k)


class ProductKeyRetriever(nn.Module):
    """Exact top-k over N entries at O(√N·c + k²) per head (Lample et al. 2019, "Large Memory
    Layers with Product Keys"). Entry i = i1·n2 + i2 has score s1[i1] + s2[i2]; entries ≥ N do
    not exist.

    Exactness with a partial last row: candidates are the top-k rows among the full rows 0..n1−2
    paired with the top-k columns, plus the last row paired with the top-k of its valid columns.
    Any true top-k entry lies in that set (if a full-row entry were missing, k entries that beat
    it would be in the set; same for the last row), so no entry is lost and none is invalid.
    """

    def __init__(self, config: DPSNRConfig, num_entries: int):
        super().__init__()
        self.num_entries = num_entries
        self.heads = config.pool_heads
        self.topk = config.pool_topk
        self.key_dim = config.pool_key_dim
        self.n1, self.n2 = product_key_sizes(num_entries)
        self.last_row_valid = num_entries - (self.n1 - 1) * self.n2  # valid columns of the last row
        half = self.key_dim // 2

        self.query = nn.Linear(config.hidden_size, self.heads * self.key_dim, bias=False)
        self.query_norm = QUERY_NORMS[config.pool_query_norm](
            self.heads, self.key_dim, config.rms_norm_eps, config.pool_query_norm_momentum
        )
        # Unit-norm sub-keys (the qk-norm of Memory Layers at Scale / UltraMem): no key can win
        # every query by growing its norm; scores are √(c/2)·cos with RMS-normalised queries.
        self.key_norm = config.pool_key_norm == "unit"
        self.sub_keys1 = nn.Parameter(torch.empty(self.heads, self.n1, half))  # (H, n1, c/2)
        self.sub_keys2 = nn.Parameter(torch.empty(self.heads, self.n2, half))  # (H, n2, c/2)
        self.selection_noise = config.pool_selection_noise
        self.balance = config.pool_balance == "bias"
        self.balance_rate = config.pool_balance_rate
        if self.balance:
            # Loss-free balancing (Wang et al. 2024; DeepSeek-V3): a per-sub-key bias that only
            # changes which entries are selected, nudged towards under-used sub-keys.
            self.register_buffer("balance_bias1", torch.zeros(self.heads, self.n1))
            self.register_buffer("balance_bias2", torch.zeros(self.heads, self.n2))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Retrieval:
        n = x.shape[0]
        q = self.query_norm(self.query(x).view(n, self.heads, self.key_dim), token_mask)  # (n, H, c)
        q1, q2 = q.chunk(2, dim=-1)  # (n, H, c/2) each
        keys1, keys2 = self.unit_keys() if self.key_norm else (self.sub_keys1, self.sub_keys2)
        # Every sub-key is scored to select, but only the k chosen entries carry gradient: their scores
        # are recomputed from the chosen sub-keys below, so backward costs O(k·c) per head instead of
        # O(√N·c) and allocates no (n, H, n1) gradient (measured: the dominant cost at 2^20 entries).
        with torch.no_grad():  # one batched matmul per head, as einsum("nhc,hmc->nhm") runs it, without its dispatch
            s1 = torch.matmul(q1.transpose(0, 1), keys1.transpose(1, 2)).transpose(0, 1)  # (n, H, n1)
            s2 = torch.matmul(q2.transpose(0, 1), keys2.transpose(1, 2)).transpose(0, 1)  # (n, H, n2)
        idx = self.select(*self._selection_scores(s1, s2))  # (n, H, k)
        # Weights use the plain scores: bias and noise only steer the selection.
        i1, i2 = idx // self.n2, idx % self.n2
        if torch.is_grad_enabled() and (q.requires_grad or keys1.requires_grad or keys2.requires_grad):
            scores = self._chosen_scores(q1, keys1, i1) + self._chosen_scores(q2, keys2, i2)  # (n, H, k)
        else:  # nothing to differentiate: the chosen entries' scores are already in s1 and s2
            scores = s1.gather(-1, i1) + s2.gather(-1, i2)
        weights = scores.float().softmax(dim=-1).to(x.dtype)
        if self.balance and self.training:
            self._update_balance(i1, i2, token_mask)
        return Retrieval(indices=idx, weights=weights)

    def _chosen_scores(self, q: torch.Tensor, keys: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """q (n, H, c/2) · keys[h, i[n, h, j]] → (n, H, k), with gradients for q and the chosen sub-keys.
        The rows are read from the flattened (H·m, c/2) table with `index_select`, whose backward is an
        `index_add`. The per-head advanced index `keys[heads, i]` it replaces backpropagates through a
        sort-based `index_put`: 12 % of an H200's kernel time in a training step of micro, most of its
        calls from here (eval/results/gpu/profile_train_step_h200.txt)."""
        heads, m, half = keys.shape
        offsets = torch.arange(0, heads * m, m, device=i.device).view(1, -1, 1)  # (1, H, 1) first row of each head
        rows = keys.reshape(heads * m, half).index_select(0, (i + offsets).reshape(-1)).view(*i.shape, half)  # (n, H, k, c/2)
        return (rows * q.unsqueeze(2)).sum(-1)  # elementwise, not k-row matmuls: faster on a CPU (eval/results/bench_throughput_scores_ab.json)

    def unit_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sub-keys scaled to unit norm. Without autograd (decoding, evaluation) kept until a sub-key
        changes (an in-place update bumps the tensor's version): decoding reads the pool at every
        step of every token, and would otherwise normalise 2·H·√N keys each time."""
        k1, k2 = self.sub_keys1, self.sub_keys2
        if (torch.is_grad_enabled() and (k1.requires_grad or k2.requires_grad)) or is_tracing():
            return F.normalize(k1, dim=-1), F.normalize(k2, dim=-1)  # a traced graph holds no host-side cache
        tag = (k1.data_ptr(), k1._version, k2.data_ptr(), k2._version, k1.dtype, k1.device)
        cached = self.__dict__.get("_unit_keys")
        if cached is None or cached[0] != tag:
            with torch.no_grad():
                cached = (tag, F.normalize(k1, dim=-1), F.normalize(k2, dim=-1))
            self.__dict__["_unit_keys"] = cached
        return cached[1], cached[2]

    def _selection_scores(self, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.balance:
            s1 = s1 + self.balance_bias1
            s2 = s2 + self.balance_bias2
        if self.training and self.selection_noise > 0:
            s1 = s1 + self.selection_noise * torch.randn_like(s1)
            s2 = s2 + self.selection_noise * torch.randn_like(s2)
        return s1, s2

    def select(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Exact top-k entries (n, H, k) from the sub-key scores (n, H, n1), (n, H, n2)."""
        k, n1, n2 = self.topk, self.n1, self.n2
        if self.last_row_valid == n2:  # N = n1·n2 (e.g. 2^16 = 256²): Lample et al.'s product top-k as is
            top1, rows = row_topk(s1, min(k, n1))  # (n, H, k)
            top2, cols = row_topk(s2, min(k, n2))  # (n, H, k)
            cand = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # (n, H, k²)
            cand_idx = (rows.unsqueeze(-1) * n2 + cols.unsqueeze(-2)).flatten(-2)
            return cand_idx.gather(-1, cand.topk(k, dim=-1).indices)  # (n, H, k)
        k1 = min(k, n1 - 1)
        kb = min(k, n2)
        klast = min(k, self.last_row_valid)
        if k1 > 0:
            top1, rows = s1[..., : n1 - 1].topk(k1, dim=-1)  # (n, H, k1) best full rows
        else:
            top1 = rows = s1[..., :0]
        top_last = s1[..., n1 - 1 :]  # (n, H, 1) the last (maybe partial) row, always a candidate
        top2, cols = s2.topk(kb, dim=-1)  # (n, H, kb)
        top2_last, cols_last = s2[..., : self.last_row_valid].topk(klast, dim=-1)  # (n, H, klast)

        full = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # (n, H, k1·kb)
        full_idx = (rows.unsqueeze(-1) * n2 + cols.unsqueeze(-2)).flatten(-2)
        last = top_last + top2_last  # (n, H, klast)
        last_idx = (n1 - 1) * n2 + cols_last
        cand = torch.cat([full, last], dim=-1)
        cand_idx = torch.cat([full_idx, last_idx], dim=-1)
        best = cand.topk(k, dim=-1).indices
        return cand_idx.gather(-1, best)  # (n, H, k)

    @torch.no_grad()
    def init_weights_(self, std: float) -> None:
        """Called by the model's `_init_weights`: sub-keys scaled so that a unit-RMS query half gives
        unit-variance scores; the balancing bias starts at zero."""
        key_std = (self.key_dim // 2) ** -0.5
        init.normal_(self.sub_keys1, mean=0.0, std=key_std)
        init.normal_(self.sub_keys2, mean=0.0, std=key_std)
        if self.balance:
            init.zeros_(self.balance_bias1)
            init.zeros_(self.balance_bias2)

    @torch.no_grad()
    def _update_balance(self, i1: torch.Tensor, i2: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """b ← b + rate·sign(mean load − load), per head and sub-key table.

        Masked tokens add 0 rather than being dropped: boolean indexing has a data-dependent shape,
        which XLA cannot compile without a host round trip (here and in the other usage counters)."""
        for ids, bias, size in ((i1, self.balance_bias1, self.n1), (i2, self.balance_bias2, self.n2)):
            hits = torch.ones_like(ids, dtype=torch.float32)  # (n, H, k)
            if token_mask is not None:
                hits = hits * token_mask.view(-1, 1, 1)
            load = torch.zeros(self.heads, size, device=ids.device, dtype=torch.float32)
            heads = torch.arange(self.heads, device=ids.device).view(1, -1, 1).expand_as(ids)
            load.index_put_((heads.reshape(-1), ids.reshape(-1)), hits.reshape(-1), accumulate=True)
            bias.add_(self.balance_rate * torch.sign(load.mean(-1, keepdim=True) - load))


class ExhaustiveRetriever(ProductKeyRetriever):
    """The reference of product keys: the same keys and weights, but every entry's score s1[i1] + s2[i2]
    is formed and the top k taken over all N, at O(N) per head. Tests check the two choose alike."""

    def select(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)[..., : self.num_entries]  # (n, H, N)
        return all_scores.topk(self.topk, dim=-1).indices


class CoordinateRetriever(nn.Module):
    """The LearnedIndexer of the coordinate pool: per head, a centre μ and a width σ > 0; the step
    reads the K contiguous rows of a window around μ, weighted by a normalised Gaussian of
    (i − μ)/σ. Cost O(K) whatever N is, and each head's read is one contiguous slice, which suits
    a pool that stays on disk. Gradients reach μ and σ through the weights.

        x ─ indexer MLP ─▶ (n, H, 2) ─▶ p = sigmoid(·) ∈ (0, 1),  σ = min_sigma + softplus(·)
          p ─ quantile warp (optional) ─▶ μ = p · (S_h − 1)       rows from the start of stripe h
          window = K rows from clamp(⌊μ⌋ − K/2, 0, S_h − K),  w = softmax(−½((i − μ)/σ)²)

    Head h addresses its own stripe of S_h ≈ N/H rows, so heads cannot all collapse onto one
    region. Inside a stripe, one-dimensional addressing still tends to collapse onto a few
    regions (DESIGN.md §3). `indexer_balance="quantile"` counters it without an auxiliary loss:
    a running histogram of each head's p (updated in training mode) defines its CDF F, and the
    head reads at F(p) instead of p. F is histogram equalisation (positions spread uniformly over
    the stripe under the data distribution), monotone, so nearby queries stay nearby, and
    piecewise linear with slope ≥ UNIFORM_FLOOR, so gradients always reach μ. It plays the role
    the selection bias plays for product keys (loss-free balancing; Wang et al. 2024).
    Positions are kept relative to the stripe in float32: exact rows up to 2^24 per stripe.
    """

    UNIFORM_FLOOR = 0.1  # share of uniform mass mixed into the histogram: the warp never goes flat

    def __init__(self, config: DPSNRConfig, num_entries: int):
        super().__init__()
        self.num_entries = num_entries
        self.heads = config.pool_heads
        self.window = config.indexer_window
        self.min_sigma = config.indexer_min_sigma
        self.indexer = nn.Sequential(
            nn.Linear(config.hidden_size, config.indexer_hidden_size),
            nn.GELU(),
            nn.Linear(config.indexer_hidden_size, 2 * self.heads),
        )
        start, size = self._stripes()
        self.register_buffer("stripe_start", start, persistent=False)  # (H,) int64, first row of each stripe
        self.register_buffer("stripe_size", size, persistent=False)  # (H,) float32, rows per stripe
        self.balance = config.indexer_balance == "quantile"
        self.bins = config.indexer_balance_bins
        self.momentum = config.indexer_balance_momentum
        if self.balance:
            self.register_buffer("position_histogram", torch.full((self.heads, self.bins), 1.0 / self.bins))

    def _stripes(self) -> tuple[torch.Tensor, torch.Tensor]:
        bounds = stripe_bounds(self.num_entries, self.heads)
        start = torch.tensor([lo for lo, _ in bounds], dtype=torch.int64)
        return start, torch.tensor([hi - lo for lo, hi in bounds], dtype=torch.float32)

    @torch.no_grad()
    def init_weights_(self, std: float) -> None:
        """Called by `_init_weights` (after the indexer's Linear layers): the stripes are
        non-persistent buffers that transformers leaves empty when loading, and the warp starts
        as the identity. transformers' init functions skip tensors loaded from a checkpoint."""
        start, size = self._stripes()
        init.copy_(self.stripe_start, start)
        init.copy_(self.stripe_size, size)
        if self.balance:
            init.constant_(self.position_histogram, 1.0 / self.bins)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Retrieval:
        raw = self.indexer(x).float().view(x.shape[0], self.heads, 2)  # (n, H, 2)
        pos = torch.sigmoid(raw[..., 0])  # (n, H) where in its stripe each head reads
        if self.balance:
            if self.training:
                self._record_positions(pos.detach(), token_mask)
            pos = self.equalise(pos)
        mu = pos * (self.stripe_size - 1)  # (n, H) rows from the stripe start
        sigma = self.min_sigma + F.softplus(raw[..., 1])  # (n, H)
        start = (mu.detach().floor() - self.window // 2).clamp(min=0).minimum(self.stripe_size - self.window)  # (n, H)
        offsets = torch.arange(self.window, device=x.device, dtype=torch.float32)  # (K,)
        z = (start.unsqueeze(-1) + offsets - mu.unsqueeze(-1)) / sigma.unsqueeze(-1)  # (n, H, K)
        weights = (-0.5 * z.pow(2)).softmax(dim=-1).to(x.dtype)  # normalised Gaussian over the window
        idx = (self.stripe_start + start.long()).unsqueeze(-1) + offsets.long()  # (n, H, K) contiguous
        return Retrieval(indices=idx, weights=weights)

    def equalise(self, pos: torch.Tensor) -> torch.Tensor:
        """p (n, H) → F_h(p): the running CDF of head h's positions, mixed with the uniform one."""
        mass = (1 - self.UNIFORM_FLOOR) * self.position_histogram + self.UNIFORM_FLOOR / self.bins  # (H, B), sums to 1
        cdf = F.pad(mass.cumsum(-1), (1, 0))  # (H, B+1)
        scaled = pos.t() * self.bins  # (H, n)
        b = scaled.detach().floor().clamp(0, self.bins - 1)
        warped = cdf.gather(1, b.long()) + (scaled - b) * mass.gather(1, b.long())  # (H, n)
        return warped.t().clamp(0.0, 1.0)

    @torch.no_grad()
    def _record_positions(self, pos: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        # Masked tokens count 0 (no boolean indexing: see ProductKeyRetriever._update_balance).
        hits = torch.ones_like(pos) if token_mask is None else token_mask.view(-1, 1).expand_as(pos).float()  # (n, H)
        b = (pos.t() * self.bins).long().clamp_(0, self.bins - 1)  # (H, n)
        counts = torch.zeros_like(self.position_histogram).scatter_add_(1, b, hits.t().contiguous())
        total = hits[:, 0].sum()
        # No tokens: weight 0 leaves the histogram exactly as it was.
        self.position_histogram.lerp_(counts / total.clamp(min=1), self.momentum * (total > 0).float())


# retrieval kind (kinds.RETRIEVAL_KINDS) → the retriever a PoolPartition of that kind reads through
RETRIEVERS: dict[str, type[nn.Module]] = {
    "product_key": ProductKeyRetriever,
    "exhaustive": ExhaustiveRetriever,
    "coordinate": CoordinateRetriever,
}


class PoolPartition(EntryTables):
    """One named partition: the entry tables of `pool_entry` (reads.py), read through the retriever of its
    retrieval kind (`RETRIEVERS`)."""

    def __init__(self, config: DPSNRConfig, name: str, num_entries: int):
        super().__init__(name, num_entries, config.hidden_size, config.partition_tables(name), config.pool_init_std)
        self.act = ACT2FN[config.pool_activation]
        self.retriever = RETRIEVERS[config.partition_retrieval(name)](config, num_entries)
        self.read_rows = ENTRY_READS[config.pool_entry]

    def attach_prefetcher(self, prefetcher) -> None:
        """Memory-mapped tables (storage.load_pool_into): ask for a read's rows as soon as they are chosen."""
        self.retriever.register_forward_hook(prefetcher)

    def forward(
        self,
        query_input: torch.Tensor,  # (n, d) what the retriever sees (normed state + step embedding)
        x: torch.Tensor,  # (n, d) what neuron entries act on (normed state)
        read: PoolRead = EAGER_READ,
        token_mask: torch.Tensor | None = None,  # (n,) False: a row whose read must not count (static driver)
        rows: torch.Tensor | None = None,  # (n,) which of the forward's B·T tokens these are (unused here)
    ) -> tuple[torch.Tensor, Retrieval]:
        r = self.retriever(query_input, token_mask)
        n, heads, k = r.indices.shape
        # The tables may live elsewhere than the controller (host memory, a memory map; see
        # storage.py): rows are gathered where the tables are, only (n, ·) results travel back.
        flat_idx = r.indices.reshape(n, heads * k).to(self.v.device)  # (n, H·k)
        coef = r.weights.reshape(n, heads * k)  # (n, H·k)
        return self.read_rows(self, flat_idx, coef, x, read), r  # (n, d)


__all__ = ["CoordinateRetriever", "ExhaustiveRetriever", "PoolPartition", "ProductKeyRetriever", "RETRIEVERS", "row_topk"]
