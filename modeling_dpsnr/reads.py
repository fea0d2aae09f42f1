"""Reading the rows a partition chose from its entry tables, by entry kind (kinds.py, `pool_entry`).

    ENTRY_READS  "neuron"  Σ_j w_j · act(u_j·x) · v_j      PEER (He 2024)
                 "value"   Σ_j w_j · v_j                   product-key memory (Lample et al. 2019)

`EntryTables` is what every partition module builds on: its (N, d) tables, plain parameters so that a
lazy row-wise optimizer, a memory-mapped file or a row-sharded tensor can stand behind them unchanged,
and the execution settings of the reads (ExecutionPlan via `apply_execution`). The weighted sum goes
through `embedding_bag` with per-sample weights, so the rows are summed without materialising them
and the tables can emit sparse (COO) gradients; the static driver (XLA, compile) uses
gather-multiply-sum instead (`weighted_row_sum`): `embedding_bag` has no XLA lowering.

Fused neuron read (`neuron_read`, last in this file): the plain read (`fused_reads=False`, and the
static driver) gathers the (n, J, d) rows of u, takes their dot products with x and sums the weighted
rows of v through `embedding_bag`. On a CPU the gather is the cost: J = heads × k rows per token,
67 MB per 2,048 tokens at d 256, written to memory once and read back, ~4× the time of the
arithmetic. Here the tokens go in chunks whose rows fit in the cache (chunk × J × d floats ≈ 2 MB),
and backward recomputes them the same way instead of keeping them. The entry tables' gradients are built once,
already coalesced: one row per distinct entry read (`index_add_` into (U, d), U ≤ n·J), a sparse COO
tensor with sparse gradients, else the rows added into a dense zero table.

    forward   per chunk: U_c = u[idx_c] (c, J, d) ─ dots = U_c·x_c ─ coef = w·act(dots) ─ out_c = Σ coef·v[idx_c]
    backward  per chunk: g_coef = v[idx_c]·g_out_c,  g_dots = w·act'(dots)·g_coef,  g_x = Σ g_dots·U_c,
              g_u[row] += g_dots·x,  g_v[row] += coef·g_out,  g_w = act(dots)·g_coef

The plain read stays the reference; tests/test_pool.py checks outputs and every gradient against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

# ---------------------------------------------------------------------------- rows of the entry tables
@dataclass
class PoolRead:
    """How one forward reads the pool: decided once by the model, before any layer runs, and handed
    down unchanged to every read (the loop carries it in its LoopContext). Not a per-call flag: a read
    never asks what driver runs it, and nothing here costs a host sync.

    static: the loop's static driver runs (XLA, torch.compile, export; ExecutionPlan.static_loop): rows
        are read by gather-multiply-sum, which lowers everywhere, instead of `embedding_bag` and the
        fused neuron read. Both give the same numbers.
    token_rows: name → (B·T, J) rows of each partition whose rows follow from the token ids (hashed
        n-grams), hashed up front (hashed.prepare_token_reads); None when the pool has none.
    """

    static: bool = False
    token_rows: dict[str, torch.Tensor] | None = None


EAGER_READ = PoolRead()  # the default: eager reads, no token rows (a partition called on its own, in tests)


@dataclass
class Retrieval:
    """Which entries a read takes, and with which weights (what a retriever returns)."""

    indices: torch.Tensor  # (n, H, k) int64, within the partition
    weights: torch.Tensor  # (n, H, k) softmax over the k entries of each head


def weighted_row_sum(
    table: torch.Tensor,
    idx: torch.Tensor,
    coef: torch.Tensor,
    sparse: bool,
    use_bag: bool,
    gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ_j coef[n, j] · table[idx[n, j]] → (n, d).

    `embedding_bag` never materialises the (n, j, d) rows; the gather path does, and is the one
    that lowers on XLA. Both give the same numbers. `gather(table, idx)` replaces the plain row
    read of the gather path (`EntryTables.gather_rows`).
    """
    if use_bag:
        return F.embedding_bag(
            idx, table, per_sample_weights=coef.to(table.dtype), mode="sum", sparse=sparse
        )
    rows = F.embedding(idx, table, sparse=sparse) if gather is None else gather(table, idx)  # (n, j, d)
    return torch.einsum("njd,nj->nd", rows, coef.to(rows.dtype))


class EntryTables(nn.Module):
    """A partition's entry tables, `tables` named as the entry kind says (each an (N, d) parameter), and
    how rows are read from them. Partition modules (retrieval.PoolPartition, hashed.HashedNgramPartition)
    build on it; the pool, storage and optimizers touch partitions only through what is defined here."""

    def __init__(self, name: str, num_entries: int, hidden_size: int, tables: tuple[str, ...], init_std: float | None):
        super().__init__()
        self.name = name
        self.num_entries = num_entries
        self.table_names = tables
        self.init_std = init_std  # config pool_init_std; None: the model's initializer_range
        for table in tables:
            setattr(self, table, nn.Parameter(torch.empty(num_entries, hidden_size)))  # (N, d)
        # Execution settings, from the ExecutionPlan (`apply_execution`), never saved.
        self.sparse_grads = False
        self.row_gather = None
        self.fused_reads = True

    def entry_tables(self) -> dict[str, nn.Parameter]:
        return {table: getattr(self, table) for table in self.table_names}

    def apply_execution(self, plan) -> None:
        """Take the reads' part of an `ExecutionPlan` (sparse gradients, row reads, fused reads)."""
        self.sparse_grads = plan.pool_sparse_grads
        self.row_gather = plan.pool_row_gather
        self.fused_reads = plan.pool_fused_reads

    @torch.no_grad()
    def init_weights_(self, std: float) -> None:
        """Called by the model's `_init_weights` (transformers' init functions skip loaded tensors)."""
        for table in self.entry_tables().values():
            init.normal_(table, mean=0.0, std=self.init_std or std)

    def gather_rows(self, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """table[idx] → (*idx.shape, d). Every row read outside `embedding_bag` goes through here, so
        training code that places the tables elsewhere (rows sharded across devices, see
        training/distributed.py) replaces this one read (`ExecutionPlan.pool_row_gather`)."""
        if self.row_gather is not None:
            return self.row_gather(table, idx)
        return F.embedding(idx, table, sparse=self.sparse_grads)

    def row_sum(self, table: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, read: PoolRead) -> torch.Tensor:
        """Σ_j coef[n, j] · table[idx[n, j]] → (n, d), summed where the table lives (host memory, a memory
        map: storage.py), so only (n, d) travels back to the controller."""
        return weighted_row_sum(table, idx, coef.to(table.device), sparse=self.sparse_grads, use_bag=not read.static,
                                gather=self.gather_rows)


# ---------------------------------------------------------------------------- entry kinds
def read_values(part: EntryTables, idx: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, read: PoolRead) -> torch.Tensor:
    """Σ_j coef[n, j] · v[idx[n, j]] → (n, d) in x's device and dtype; idx, coef (n, J) where the tables are."""
    return part.row_sum(part.v, idx, coef, read).to(x.device, x.dtype)


def read_neurons(part: EntryTables, idx: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, read: PoolRead) -> torch.Tensor:
    """Σ_j coef[n, j] · act(u[idx[n, j]] · x[n]) · v[idx[n, j]] → (n, d); `part.act` is the activation."""
    if part.fused_reads and not read.static and part.row_gather is None and part.v.device == x.device:
        # Chunked read that never materialises the gathered rows; the plain one below is its reference,
        # and the static driver's (it lowers on XLA).
        return neuron_read(part.u, part.v, idx, coef.to(x.dtype), x, part.act, part.sparse_grads)
    u_rows = part.gather_rows(part.u, idx).to(x.device, x.dtype)  # (n, J, d)
    coef = coef * part.act(torch.einsum("nkd,nd->nk", u_rows, x))  # (n, J)
    return read_values(part, idx, coef, x, read)


# entry kind (kinds.ENTRY_KINDS) → how a partition combines the rows it chose
ENTRY_READS: dict[str, Callable[..., torch.Tensor]] = {"neuron": read_neurons, "value": read_values}


# ---------------------------------------------------------------------------- the fused neuron read
CHUNK_FLOATS = 1 << 19  # gathered floats per chunk (2 MB in float32): rows stay in a core's cache


def neuron_read(u: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
                act: Callable[[torch.Tensor], torch.Tensor], sparse: bool) -> torch.Tensor:
    """Σ_j weights[n, j] · act(u[idx[n, j]] · x[n]) · v[idx[n, j]] → (n, d); idx, weights (n, J), x (n, d)."""
    return _NeuronRead.apply(u, v, idx, weights, x, act, sparse)


def _chunks(n: int, J: int, d: int):
    step = max(1, CHUNK_FLOATS // max(1, J * d))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class _NeuronRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, v, idx, weights, x, act, sparse):
        n, J = idx.shape
        d = u.shape[1]
        out = x.new_empty(n, d)
        dots = x.new_empty(n, J)  # (n, J) u·x, kept for backward (small)
        for a, b in _chunks(n, J, d):
            rows = F.embedding(idx[a:b], u).to(x.dtype)  # (c, J, d), in cache (tables may be fp16 on disk)
            dots[a:b] = torch.bmm(rows, x[a:b].unsqueeze(-1)).squeeze(-1)
            coef = weights[a:b] * act(dots[a:b])
            out[a:b] = F.embedding_bag(idx[a:b], v, per_sample_weights=coef.to(v.dtype), mode="sum").to(x.dtype)
        ctx.save_for_backward(u, v, idx, weights, x, dots)
        ctx.act, ctx.sparse = act, sparse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, v, idx, weights, x, dots = ctx.saved_tensors
        n, J = idx.shape
        d = u.shape[1]
        with torch.enable_grad():  # act and act' from autograd on the small (n, J) dots: any activation
            dots_ = dots.detach().requires_grad_()
            acted = ctx.act(dots_)
        grad_out = grad_out.contiguous()
        g_coef = torch.empty_like(dots)
        g_x = torch.empty_like(x) if ctx.needs_input_grad[4] else None
        for a, b in _chunks(n, J, d):
            g_coef[a:b] = torch.bmm(F.embedding(idx[a:b], v).to(grad_out.dtype), grad_out[a:b].unsqueeze(-1)).squeeze(-1)
        g_w = acted.detach() * g_coef if ctx.needs_input_grad[3] else None
        (g_dots,) = torch.autograd.grad(acted, dots_, weights * g_coef)  # (n, J)
        coef = weights * acted.detach()  # (n, J)
        if g_x is not None:
            for a, b in _chunks(n, J, d):
                g_x[a:b] = torch.bmm(g_dots[a:b].unsqueeze(1), F.embedding(idx[a:b], u).to(x.dtype)).squeeze(1)
        # Entry gradients, one row per distinct entry (the COO tensor is coalesced from the start), each
        # chunk's per-read rows summed while they are in cache.
        rows, slot = idx.reshape(-1).unique(return_inverse=True)  # (U,), (n·J,)
        slot = slot.view(n, J)
        want_u, want_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sum_u = x.new_zeros(rows.shape[0], d) if want_u else None
        sum_v = x.new_zeros(rows.shape[0], d) if want_v else None
        for a, b in _chunks(n, J, d):
            where = slot[a:b].reshape(-1)
            if want_u:
                sum_u.index_add_(0, where, (g_dots[a:b].unsqueeze(-1) * x[a:b].unsqueeze(1)).reshape(-1, d))
            if want_v:
                sum_v.index_add_(0, where, (coef[a:b].unsqueeze(-1) * grad_out[a:b].unsqueeze(1)).reshape(-1, d))
        g_u = _as_table_grad(u, rows, sum_u, ctx.sparse) if want_u else None
        g_v = _as_table_grad(v, rows, sum_v, ctx.sparse) if want_v else None
        return g_u, g_v, None, g_w, g_x, None, None


def _as_table_grad(table: torch.Tensor, rows: torch.Tensor, summed: torch.Tensor, sparse: bool) -> torch.Tensor:
    """(U, d) sums of distinct rows → the table's gradient: sparse COO, or a dense table of zeros elsewhere."""
    summed = summed.to(table.dtype)
    if sparse:  # rows are unique and sorted: coalesced by construction (no invariant check needed)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), summed, table.shape, is_coalesced=True, check_invariants=False)
    return table.new_zeros(table.shape).index_copy_(0, rows, summed)


__all__ = ["CHUNK_FLOATS", "EAGER_READ", "ENTRY_READS", "EntryTables", "PoolRead", "Retrieval", "neuron_read", "read_neurons", "read_values",
           "weighted_row_sum"]
