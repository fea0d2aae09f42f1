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
and backward recomputes them the same way instead of keeping them. The entry tables' gradients are
built once per forward, already coalesced: each read leaves its rows' gradients in factored form
(coefficient × a token's vector), and one segmented sum over every read of the forward (`row_sums`,
`embedding_bag` over the reads sorted by row) gives one row per distinct entry read (U ≤ steps·n·J):
a sparse COO tensor with sparse gradients, else the rows added into a dense zero table
(`TableGradients`; a read outside a training forward sums its own).

    forward   per chunk: U_c = u[idx_c] (c, J, d) ─ dots = U_c·x_c ─ coef = w·act(dots) ─ out_c = Σ coef·v[idx_c]
    backward  per chunk: g_coef = v[idx_c]·g_out_c,  g_dots = w·act'(dots)·g_coef,  g_x = Σ g_dots·U_c,
              g_w = act(dots)·g_coef;  after the forward's last read: g_u[row] = Σ g_dots·x,  g_v[row] = Σ coef·g_out

Value entries take the same route in training (`_ValueRead`: `embedding_bag` forward, the weights'
gradient by chunked row dots, the table's gradient summed once per forward).

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
    table_grads: partition name → its TableGradients for this forward, made at the partition's first
        fused read: every read of the forward (one per loop step) leaves its part and each table gets
        one gradient, summed once in backward. None (EAGER_READ, no-grad forwards, the static driver,
        reads that a checkpointed layer may recompute: a retrofitted memory): each read returns its
        own gradient, and autograd sums them.
    """

    static: bool = False
    token_rows: dict[str, torch.Tensor] | None = None
    table_grads: dict[str, TableGradients] | None = None


EAGER_READ = PoolRead()  # the default: eager reads, no token rows (a partition called on its own, in tests)


class TableGradients:
    """The entry-table gradients of one forward's reads of one partition, summed once.

    A partition is read once per loop step; with a gradient per read, autograd adds 4 sparse (or dense,
    pool-sized) gradients per table and the optimizer coalesces their sum: in a profile of micro's
    training step, most of the reads' backward time. Here the tables enter the graph once per forward through `_TapTables`, whose outputs
    every read uses. Each read's backward leaves its part in factored form, row j of token n getting
    coef[n, j] · src[n] (neuron entries: u gets act'-weighted dots × x, v gets the coefficients × the
    output gradient), and after the last read the tap sums all of them per distinct row in one
    segmented sum (`row_sums`): one gradient per table per step, as a plain parameter gets from
    autograd, and no (n, J, d) per-read rows.
    """

    def __init__(self, tables: tuple[torch.Tensor, ...], sparse: bool):
        self.sparse = sparse
        self.reads: list[torch.Tensor] = []  # (n, J) row ids of each read, in forward order
        self.parts: dict[int, tuple] = {}  # read → per table (coef (n, J), src (n, d)) or None, from backward
        self.sums: list[torch.Tensor | None] | None = None  # per table (U, d), at the tap
        self.rows: torch.Tensor | None = None  # (U,) the distinct rows the sums belong to
        self.tapped = _TapTables.apply(self, *tables) if len(tables) > 1 else (_TapTables.apply(self, *tables),)

    def record(self, idx: torch.Tensor) -> int | None:
        """A read's (n, J) rows, at forward; its number, or None once backward began (a recomputation
        under activation checkpointing: the first forward's record stands)."""
        if self.parts:
            return None
        self.reads.append(idx)
        return len(self.reads) - 1

    def add(self, read: int, parts: tuple) -> None:
        """Read `read`'s gradient parts, one per table: (coef (n, J), src (n, d)) or None."""
        self.parts[read] = parts

    def table_grad(self, i: int, table: torch.Tensor) -> torch.Tensor | None:
        if self.sums is None:
            self._sum()
        if self.sums[i] is None:
            return None
        grad = _as_table_grad(table, self.rows, self.sums[i], self.sparse)
        self.sums[i] = None
        return grad

    def _sum(self) -> None:
        done = sorted(self.parts)
        self.sums = [None] * len(self.parts[done[0]]) if done else []
        if not done:
            return
        idx = torch.cat([self.reads[r].reshape(-1) for r in done])
        self.rows, slot = idx.unique(return_inverse=True)
        for i in range(len(self.sums)):
            if self.parts[done[0]][i] is None:
                continue
            coef = torch.cat([self.parts[r][i][0].reshape(-1) for r in done])  # in the order of idx
            src = torch.cat([self.parts[r][i][1] for r in done])
            self.sums[i] = row_sums(slot, self.rows.shape[0], coef, src)
        self.parts, self.reads = {}, []


def row_sums(slot: torch.Tensor, num_rows: int, coef: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """(U, d) with row s = Σ over reads r of slot s of coef[r] · src[r // J], J = reads per src row:
    the segmented sum of a table's gradient, never materialising the (R, d) per-read rows.
    slot, coef (R,) with R = J · src rows. `embedding_bag` over the reads in row order (a stable sort:
    the summation order, and so the result, is deterministic)."""
    coef = coef.reshape(-1)
    J = slot.shape[0] // src.shape[0]
    order = torch.argsort(slot, stable=True)
    counts = torch.bincount(slot, minlength=num_rows)
    return F.embedding_bag(order // J, src, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=coef[order].to(src.dtype))


class _TapTables(torch.autograd.Function):
    """Identity on the tables; in backward, hands them the gradients their TableGradients summed (plus
    any other gradient that reached the tapped tables)."""

    @staticmethod
    def forward(ctx, grads: TableGradients, *tables):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tables)
        return tuple(t.view_as(t) for t in tables) if len(tables) > 1 else tables[0].view_as(tables[0])

    @staticmethod
    def backward(ctx, *incoming):  # runs after every read's backward: they all use the tapped tables
        out = []
        for i, (table, other) in enumerate(zip(ctx.saved_tensors, incoming)):
            grad = ctx.grads.table_grad(i, table)
            out.append(other if grad is None else grad if other is None else grad + other)
        return (None, *out)


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
    if part.fused_reads and not read.static and part.row_gather is None and part.v.device == x.device:
        # embedding_bag forward; the table's gradient summed once per forward like the neuron read's
        grads = _table_gradients(part, read, (part.v,))
        v = part.v if grads is None else grads.tapped[0]
        return _ValueRead.apply(v, idx, coef.to(x.dtype), part.sparse_grads, grads).to(x.dtype)
    return part.row_sum(part.v, idx, coef, read).to(x.device, x.dtype)


def _table_gradients(part: EntryTables, read: PoolRead, tables: tuple[torch.Tensor, ...]) -> TableGradients | None:
    """The partition's TableGradients of this forward (made at its first read), or None when each read
    returns its own gradient (no training forward, or no table needs one)."""
    if read.table_grads is None or not torch.is_grad_enabled() or not any(t.requires_grad for t in tables):
        return None
    grads = read.table_grads.get(part.name)
    if grads is None:
        grads = read.table_grads[part.name] = TableGradients(tables, part.sparse_grads)
    return grads


def read_neurons(part: EntryTables, idx: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, read: PoolRead) -> torch.Tensor:
    """Σ_j coef[n, j] · act(u[idx[n, j]] · x[n]) · v[idx[n, j]] → (n, d); `part.act` is the activation."""
    if part.fused_reads and not read.static and part.row_gather is None and part.v.device == x.device:
        # Chunked read that never materialises the gathered rows; the plain one below is its reference,
        # and the static driver's (it lowers on XLA).
        if not torch.is_grad_enabled():  # decoding, evaluation: the forward alone, without autograd's Function
            return _neuron_forward(part.u, part.v, idx, coef.to(x.dtype), x, part.act)[0]
        grads = _table_gradients(part, read, (part.u, part.v))
        if grads is None:
            return neuron_read(part.u, part.v, idx, coef.to(x.dtype), x, part.act, part.sparse_grads)
        u, v = grads.tapped
        return neuron_read(u, v, idx, coef.to(x.dtype), x, part.act, part.sparse_grads, grads)
    u_rows = part.gather_rows(part.u, idx).to(x.device, x.dtype)  # (n, J, d)
    coef = coef * part.act(torch.einsum("nkd,nd->nk", u_rows, x))  # (n, J)
    return read_values(part, idx, coef, x, read)


# entry kind (kinds.ENTRY_KINDS) → how a partition combines the rows it chose
ENTRY_READS: dict[str, Callable[..., torch.Tensor]] = {"neuron": read_neurons, "value": read_values}


# ---------------------------------------------------------------------------- the fused neuron read
CHUNK_FLOATS = 1 << 19  # gathered floats per chunk on a CPU (2 MB in float32): rows stay in a core's cache
# On an accelerator the chunks only bound memory (128 MB in float32): cache-sized ones there cost
# kernel launches each — a GPU training step of micro at 32 × 256 tokens ran ~1,550 chunks per step,
# ~4,800 kernel launches, and its host side took 4.9× the GPU's time (torch.profiler on an H200:
# eval/results/gpu/profile_train_step_h200_cache_chunks.txt, and profile_train_step_h200.txt after).
ACCELERATOR_CHUNK_FLOATS = 1 << 25


def neuron_read(u: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
                act: Callable[[torch.Tensor], torch.Tensor], sparse: bool,
                grads: TableGradients | None = None) -> torch.Tensor:
    """Σ_j weights[n, j] · act(u[idx[n, j]] · x[n]) · v[idx[n, j]] → (n, d); idx, weights (n, J), x (n, d).
    With `grads` (u and v its tapped tables), the entry gradients go into its shared buffers."""
    return _NeuronRead.apply(u, v, idx, weights, x, act, sparse, grads)


def _chunks(n: int, J: int, d: int, device: torch.device):
    budget = CHUNK_FLOATS if device.type == "cpu" else ACCELERATOR_CHUNK_FLOATS
    step = max(1, budget // max(1, J * d))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _row_dots(table: torch.Tensor, idx: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """(n, J) dots table[idx[n, j]] · vecs[n], the rows gathered a cache-sized chunk at a time."""
    n, J = idx.shape
    chunks = _chunks(n, J, table.shape[1], vecs.device)
    if len(chunks) == 1:  # e.g. decoding: no output buffer to fill
        return torch.bmm(F.embedding(idx, table).to(vecs.dtype), vecs.unsqueeze(-1)).squeeze(-1)
    out = vecs.new_empty(n, J)
    for a, b in chunks:
        out[a:b] = torch.bmm(F.embedding(idx[a:b], table).to(vecs.dtype), vecs[a:b].unsqueeze(-1)).squeeze(-1)
    return out


def _own_table_grads(tables, idx: torch.Tensor, parts, sparse: bool) -> list[torch.Tensor | None]:
    """One read's gradient of each table (None where its part is None): row idx[n, j] gets
    coef[n, j] · src[n] for part (coef, src), one row per distinct entry."""
    if all(part is None for part in parts):
        return [None] * len(parts)
    rows, slot = idx.reshape(-1).unique(return_inverse=True)  # (U,), (n·J,)
    return [None if part is None else _as_table_grad(table, rows, row_sums(slot, rows.shape[0], *part), sparse)
            for table, part in zip(tables, parts)]


def _neuron_forward(u, v, idx, weights, x, act) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (n, d), dots (n, J)): u·x with the rows gathered in cache (tables may be fp16 on disk), then
    the weighted, activated sum of v's rows through `embedding_bag`."""
    dots = _row_dots(u, idx, x)
    return F.embedding_bag(idx, v, per_sample_weights=(weights * act(dots)).to(v.dtype), mode="sum").to(x.dtype), dots


class _NeuronRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, v, idx, weights, x, act, sparse, grads):
        out, dots = _neuron_forward(u, v, idx, weights, x, act)  # dots (n, J) kept for backward (small)
        ctx.save_for_backward(u, v, idx, weights, x, dots)
        ctx.act, ctx.sparse = act, sparse
        ctx.grads, ctx.read = grads, (grads.record(idx) if grads is not None else None)
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
        g_coef = _row_dots(v, idx, grad_out.to(dots.dtype))  # (n, J)
        g_x = torch.empty_like(x) if ctx.needs_input_grad[4] else None
        g_w = acted.detach() * g_coef if ctx.needs_input_grad[3] else None
        (g_dots,) = torch.autograd.grad(acted, dots_, weights * g_coef)  # (n, J)
        coef = weights * acted.detach()  # (n, J)
        if g_x is not None:
            for a, b in _chunks(n, J, d, x.device):
                g_x[a:b] = torch.bmm(g_dots[a:b].unsqueeze(1), F.embedding(idx[a:b], u).to(x.dtype)).squeeze(1)
        # Entry gradients: row idx[n, j] of u gets g_dots[n, j] · x[n], of v coef[n, j] · grad_out[n]. With
        # shared TableGradients they are summed with every other read of the forward at its tap;
        # else here, one row per distinct entry (the COO tensor is coalesced from the start).
        want_u, want_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        parts = ((g_dots, x) if want_u else None, (coef, grad_out) if want_v else None)
        if ctx.grads is not None and ctx.read is not None:
            ctx.grads.add(ctx.read, parts)
            return None, None, None, g_w, g_x, None, None, None
        g_u, g_v = _own_table_grads((u, v), idx, parts, ctx.sparse)
        return g_u, g_v, None, g_w, g_x, None, None, None


class _ValueRead(torch.autograd.Function):
    """Σ_j w[n, j] · v[idx[n, j]]: `embedding_bag` forward; backward g_w = v[idx]·g_out in cache-sized
    chunks, and v's gradient (row idx[n, j] gets w[n, j] · g_out[n]) summed per distinct row, here or,
    with shared TableGradients, once for every read of the forward."""

    @staticmethod
    def forward(ctx, v, idx, weights, sparse, grads):
        out = F.embedding_bag(idx, v, per_sample_weights=weights.to(v.dtype), mode="sum")
        ctx.save_for_backward(v, idx, weights)
        ctx.sparse, ctx.grads = sparse, grads
        ctx.read = grads.record(idx) if grads is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        v, idx, weights = ctx.saved_tensors
        g = grad_out.contiguous().to(weights.dtype)
        g_w = _row_dots(v, idx, g) if ctx.needs_input_grad[2] else None
        part = (weights, g) if ctx.needs_input_grad[0] else None
        if ctx.grads is not None and ctx.read is not None:
            ctx.grads.add(ctx.read, (part,))
            return None, None, g_w, None, None
        return _own_table_grads((v,), idx, (part,), ctx.sparse)[0], None, g_w, None, None


def _as_table_grad(table: torch.Tensor, rows: torch.Tensor, summed: torch.Tensor, sparse: bool) -> torch.Tensor:
    """(U, d) sums of distinct rows → the table's gradient: sparse COO, or a dense table of zeros elsewhere."""
    summed = summed.to(table.dtype)
    if sparse:  # rows are unique and sorted: coalesced by construction (no invariant check needed)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), summed, table.shape, is_coalesced=True, check_invariants=False)
    return table.new_zeros(table.shape).index_copy_(0, rows, summed)


__all__ = ["ACCELERATOR_CHUNK_FLOATS", "CHUNK_FLOATS", "EAGER_READ", "ENTRY_READS", "EntryTables", "PoolRead", "Retrieval", "TableGradients", "neuron_read", "row_sums", "read_neurons", "read_values",
           "weighted_row_sum"]
