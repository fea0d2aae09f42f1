"""Parallelism for DPSN-R, applied from the training side (the model knows nothing about devices).

Three things the stock machinery does not do for the pool's entry tables, each with an existing
engine underneath:

1. **Data parallel with sparse pool gradients.** DDP buckets gradients in flat dense buffers and
   only expects sparse ones from `nn.Embedding(sparse=True)` modules. The pool reads its plain
   `(N, d)` tables with `F.embedding(sparse=True)`, so DDP fails on their COO gradients ("Cannot
   access storage of SparseTensorImpl"; the pool would get no gradient, DESIGN.md §8.5). The
   tables are therefore left out of DDP (`exclude_from_ddp`) and their gradients are averaged
   after the backward that DDP reduces in (`all_reduce_sparse_grads`): gloo's native sparse
   all-reduce, or on backends without one (NCCL) an all-gather of the rows. Every rank then holds
   the same summed rows, divided by the world size exactly as DDP averages the dense gradients,
   so `SparseRowAdam` makes the same update on every rank as a single process on the global batch.
   Communication is O(rows read), not O(N).

2. **Pool rows sharded across processes** (`shard_pool_rows`): each table becomes a DTensor with
   `Shard(0)` over a 1-D device mesh, as `torch.distributed.tensor.parallel.RowwiseParallel` does
   for an embedding. Each rank stores N/world rows; a read gathers the local rows (zeros for rows
   another rank holds) and one all-reduce sums them, so every rank gets the exact rows the
   unsharded table would give (retrieval itself is unchanged: the retrievers stay replicated).
   The backward of that read lands each row's gradient on the rank that owns it. The read is
   swapped in through the model's execution plan (`pool_row_gather`); the loop switches to its static (gather) path,
   since DTensor has no sharding rule for `embedding_bag`.

3. **XLA (TPU).** Sparse tensors do not exist on XLA, so the pool's gradients are dense there
   (`sparse_grads_supported`), and on an SPMD mesh `shard_pool_rows` marks the tables' rows as
   sharded with `torch_xla.distributed.spmd.mark_sharding`; the XLA partitioner does the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging
from .pool_optim import coalesced

logger = logging.get_logger(__name__)

# Backends whose all_reduce accepts sparse COO tensors (sums them; duplicates are kept as rows).
_SPARSE_ALLREDUCE_BACKENDS = ("gloo",)


def is_xla_device(device: torch.device | str) -> bool:
    return torch.device(device).type == "xla"


def sparse_grads_supported(device: torch.device | str) -> bool:
    """Whether sparse COO gradients exist on `device`: not on XLA, where every tensor is dense."""
    return not is_xla_device(device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / accelerate wrappers (each keeps it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def pool_table_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """Fully qualified name → entry table, for every pool table of a DPSN-R model (or a wrapper)."""
    tables = {id(p) for p in unwrap_model(model).pool.entry_parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in tables}


# ---------------------------------------------------------------------------- data parallel
def exclude_from_ddp(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Keep DDP away from `params` (named as in `model`) and make them equal on every rank.

    Must run before DDP wraps `model`. DDP's own start-up broadcast skips ignored parameters, so
    rank 0's values are broadcast here (in place; a no-op outside a process group).
    """
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(params))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in params.values():
                dist.broadcast(p.data, src=0)


def all_reduce_sparse_grads(params: list[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Average the (sparse COO) gradients of `params` over the ranks of `group`, in place.

    Every rank must call this with the same parameters in the same order. A parameter without a
    gradient on this rank (no row read) joins with an empty one, so the collectives always match.
    The result is a coalesced sparse gradient: rows read on any rank, each the mean over ranks of
    the per-rank sums, as DDP's mean of dense gradients would give.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return
    native = dist.get_backend(group) in _SPARSE_ALLREDUCE_BACKENDS
    for p in params:
        grad = p.grad if p.grad is not None else _empty_sparse_like(p)
        if not grad.is_sparse:
            raise ValueError(f"all_reduce_sparse_grads: expected a sparse gradient, got a dense one of shape {tuple(grad.shape)}")
        grad = coalesced(grad)  # sums this rank's duplicates before anything travels
        if native:
            dist.all_reduce(grad, group=group)
        else:
            grad = _all_gather_sparse(grad, world, group)
        p.grad = (grad / world).coalesce()


def _empty_sparse_like(p: torch.Tensor) -> torch.Tensor:
    indices = torch.zeros(1, 0, dtype=torch.long, device=p.device)
    return torch.sparse_coo_tensor(indices, p.new_zeros(0, *p.shape[1:]), p.shape)


def _all_gather_sparse(grad: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of every rank's row-sparse `grad` through `all_gather` (backends without sparse
    all-reduce, e.g. NCCL). Ranks read different numbers of rows, so each pads to the largest count
    and the padding is cut off again before summing: a padding row would otherwise count as read."""
    rows, values = grad._indices()[0], grad._values()  # (U,), (U, d)
    count = torch.tensor([rows.numel()], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = max(int(c.item()) for c in counts)
    pad = most - rows.numel()
    rows = F.pad(rows, (0, pad))
    values = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    dist.all_gather(all_values, values, group=group)
    sizes = [int(c.item()) for c in counts]
    rows = torch.cat([r[:n] for r, n in zip(all_rows, sizes)])
    values = torch.cat([v[:n] for v, n in zip(all_values, sizes)])
    summed = torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape)
    return summed.coalesce()


# ---------------------------------------------------------------------------- row sharding
def shard_pool_rows(model: nn.Module, mesh) -> nn.Module:
    """Shard the rows of every pool table of `model` over a 1-D `mesh`, in place; returns `model`.

    `mesh` is a `torch.distributed.device_mesh.DeviceMesh` (DTensor, any backend) or a
    `torch_xla.distributed.spmd.Mesh` (XLA SPMD; the tables must already be on the XLA device).
    Retrieval results, outputs and gradients equal the unsharded model's (tests/test_distributed.py,
    tests/xla/). The pool's gradients become dense (sharded) tensors: train a sharded pool with a
    dense optimizer (`pool_optimizer="dense"`).
    """
    core = unwrap_model(model)
    if getattr(mesh, "ndim", len(getattr(mesh, "mesh_shape", (0, 0)))) != 1:
        raise ValueError(f"shard_pool_rows: expected a 1-D mesh, got {mesh!r}")
    core.set_execution(pool_sparse_grads=False)
    if _is_xla_mesh(mesh):
        _mark_rows_sharded_xla(core, mesh)
        return model
    from torch.distributed.tensor import Shard, distribute_tensor

    for part in core.pool.partitions.values():
        for name, table in part.entry_tables().items():
            if table.shape[0] < mesh.size():
                raise ValueError(f"shard_pool_rows: partition {part.name!r} has {table.shape[0]} rows, fewer than the {mesh.size()} ranks")
            sharded = distribute_tensor(table.detach(), mesh, [Shard(0)])
            setattr(part, name, nn.Parameter(sharded, requires_grad=table.requires_grad))
    if core.execution.loop_mode != "static":
        logger.info("shard_pool_rows: loop_mode set to 'static' (row-sharded tables are read by gather, not embedding_bag)")
    core.set_execution(loop_mode="static", pool_row_gather=_sharded_gather)  # only the row read changes
    return model


def _sharded_gather(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for a row-sharded DTensor `table` and a plain (replicated) `idx`, as a plain tensor.

    `local_map` runs `_read_local_rows` on each rank's shard; its output is a pending sum
    (`Partial`) that `redistribute(Replicate)` all-reduces. Autograd runs back through the same
    local function, so each rank's table gradient covers its own rows only (`Shard(0)`): DTensor's
    built-in embedding rule would give every rank a replicated (N, d) gradient instead, because
    torch has no row-wise rule for `embedding_dense_backward`.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import local_map

    if not isinstance(table, DTensor):
        return F.embedding(idx, table)
    mesh = table.device_mesh
    # torch.chunk layout of Shard(0): every rank but the last holds ceil(N / world) rows.
    start = mesh.get_local_rank() * -(-table.shape[0] // mesh.size())
    read = local_map(_read_local_rows, out_placements=[Partial()], in_placements=([Shard(0)], None, None), device_mesh=mesh)
    return read(table, idx, start).redistribute(mesh, [Replicate()]).to_local()


def _read_local_rows(local_table: torch.Tensor, idx: torch.Tensor, start: int) -> torch.Tensor:
    """Rows of `idx` that fall in [start, start + local rows), zeros elsewhere: (*idx.shape, d)."""
    local = idx - start
    mine = (local >= 0) & (local < local_table.shape[0])
    rows = F.embedding(local.clamp(0, local_table.shape[0] - 1), local_table)
    return rows * mine.unsqueeze(-1).to(rows.dtype)


def _is_xla_mesh(mesh) -> bool:
    return type(mesh).__module__.startswith("torch_xla")


def _mark_rows_sharded_xla(core: nn.Module, mesh) -> None:
    import torch_xla.distributed.spmd as xs  # only here: torch_xla is optional

    axis = mesh.axis_names[0] if getattr(mesh, "axis_names", None) else 0
    for part in core.pool.partitions.values():
        for table in part.entry_tables().values():
            if not is_xla_device(table.device):
                raise ValueError("shard_pool_rows: move the model to the XLA device before sharding it on an XLA mesh")
            xs.mark_sharding(table, mesh, (axis, None))
