"""Reading neuron entries without materialising the gathered rows: Σ_j w_j · act(u_j·x) · v_j.

The plain read (`pool.PoolPartition` with `fused_reads=False`, and the static driver) gathers the
(n, J, d) rows of u, takes their dot products with x and sums the weighted rows of v through
`embedding_bag`. On a CPU the gather is the cost: J = heads × k rows per token, 67 MB per 2,048
tokens at d 256, written to memory once and read back, ~4× the time of the arithmetic. Here the
tokens go in chunks whose rows fit in the cache (chunk × J × d floats ≈ 2 MB), and backward
recomputes them the same way instead of keeping them. The entry tables' gradients are built once,
already coalesced: one row per distinct entry read (`index_add_` into (U, d), U ≤ n·J), a sparse COO
tensor with sparse gradients, else the rows added into a dense zero table.

    forward   per chunk: U_c = u[idx_c] (c, J, d) ─ dots = U_c·x_c ─ coef = w·act(dots) ─ out_c = Σ coef·v[idx_c]
    backward  per chunk: g_coef = v[idx_c]·g_out_c,  g_dots = w·act'(dots)·g_coef,  g_x = Σ g_dots·U_c,
              g_u[row] += g_dots·x,  g_v[row] += coef·g_out,  g_w = act(dots)·g_coef

The plain read stays the reference; tests/test_pool.py checks outputs and every gradient against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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


__all__ = ["neuron_read", "CHUNK_FLOATS"]
