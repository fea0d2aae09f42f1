"""Sparse optimizer for the pool: lazy row-wise Adam whose step costs O(rows touched).

Why a custom optimizer (DESIGN.md §4): a training step reads a few thousand rows of a pool of
millions. Dense AdamW rewrites every row of the parameter and of both moments each step, so its
cost grows with the pool, not with the batch. torch's ``SparseAdam`` only updates the rows of a
sparse gradient, but it dedups with ``Tensor.coalesce()`` (~5x slower than the segmented sum
below), keeps one step count per tensor, and on CPU was measured slower than fused dense AdamW
up to ~2^20 rows and ~2x slower than this optimizer at 2^24 (``eval/bench_optimizer.py``
compares all of them). ``SparseRowAdam`` gathers the touched rows, runs Adam on them and
scatters them back: nothing in ``step`` reads or allocates a full-table tensor, so untouched
rows of the parameter *and* of the optimizer state stay bit-identical.

Algorithm, per touched row r with summed gradient g_r (Kingma & Ba 2015, Adam, Algorithm 1):

    t_r  <- t_r + 1                       per-row step counter (see below)
    m_r  <- b1 m_r + (1 - b1) g_r
    v_r  <- b2 v_r + (1 - b2) g_r^2       or, row-wise: b2 v_r + (1 - b2) mean(g_r^2)
    p_r  <- p_r - lr / (1 - b1^t_r) * m_r / (sqrt(v_r / (1 - b2^t_r)) + eps)

"Lazy": rows without gradient keep their moments undecayed, as in torch's ``SparseAdam`` and
TensorFlow Addons' ``LazyAdam``. Those two use one step count per *tensor* for the bias
correction. Here each row has its own count (an int32 per row, 4 bytes, enough for 2^31
updates of one row), so a row touched for the first time at global step 10^4 gets exactly
Adam's first-step correction instead of an almost-uncorrected (1 - b)-sized moment; with every
row touched every step the two coincide and the update equals ``torch.optim.Adam``.

Row-wise second moment (``rowwise_second_moment=True``): one scalar per row, the running mean
of the squared gradient over the row, instead of one per element. This is the "row-wise
AdaGrad" used for the embedding tables of DLRM (Naumov et al. 2019; Mudigere et al. 2022),
a per-row analogue of Adafactor's factored second moment (Shazeer & Stern 2018), and the kind
of memory-lean sparse update used for the values of large memory layers (Lample et al. 2019;
Berges et al. 2024, "Memory Layers at Scale"). Optimizer memory is then one table for m plus
N scalars for v plus N int32 step counts, instead of two tables.

Gradients may be sparse COO tensors (``F.embedding(sparse=True)``, ``F.embedding_bag(
sparse=True)``), which list one row per lookup and so repeat rows: repeated rows are summed
(several tokens reading one row add up, never last-write-wins). Dense gradients are accepted
for compatibility: a row counts as touched when any element of its gradient is nonzero.
Finding those rows scans the whole gradient, so the dense path is O(N) and exists for
correctness, not speed.

No weight decay: decaying only the rows that happen to be read would shrink popular rows and
spare the rest, and a dense decay would cost O(N) per step (DESIGN.md §4: no decay on the pool).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SparseRowAdam", "clip_grad_norm_", "segment_sum"]

# Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does, so a zero
# gradient gives a finite coefficient.
_CLIP_EPS = 1e-6


def segment_sum(index: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the rows of ``values`` (nnz, d) that share an ``index`` (nnz,).

    Returns ``(rows, summed)``: the sorted distinct indices (U,) and their sums (U, d).
    Cost O(nnz log nnz) for the sort plus O(nnz * d) for the sums, independent of the table.
    The segmented sum is ``F.embedding_bag(mode="sum")`` over the sorted order: that is exactly
    a gather followed by a per-segment sum, and on CPU its kernel was measured ~2x faster than
    ``index_add_`` into the distinct rows and, with the sort, ~4-5x faster than
    ``Tensor.coalesce()`` (eval/bench_optimizer.py times the latter pair).
    A stable sort keeps the summation order of duplicates fixed, so results are deterministic.
    """
    sorted_index, order = torch.sort(index, stable=True)
    rows, counts = torch.unique_consecutive(sorted_index, return_counts=True)  # (U,), (U,)
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], dim=0, out=offsets[1:])  # start of each row's segment
    summed = F.embedding_bag(order, values, offsets, mode="sum")  # (U, d)
    return rows, summed


def rows_are_distinct(grad: Tensor) -> bool:
    """Whether a row-sparse COO gradient already lists each row once, in order: `is_coalesced()`, or
    strictly increasing row indices. The second test (O(nnz) on the indices only) matters because
    autograd's gradient accumulation re-wraps a fresh sparse gradient without its coalesced flag:
    the pool reads' gradients arrive coalesced by construction (modeling_dpsnr/reads.py) but
    flagged otherwise, and a sort + sum (or `coalesce()`) of ~30k rows × d per table per step is
    then wasted work."""
    if grad.is_coalesced():
        return True
    if grad.sparse_dim() != 1:
        return False
    rows = grad._indices()[0]
    return rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())


def coalesced(grad: Tensor) -> Tensor:
    """`grad.coalesce()`, without the sort and sum when its rows are already distinct and ordered
    (`rows_are_distinct`): then the same indices and values, flagged coalesced."""
    if grad.is_coalesced():
        return grad
    if rows_are_distinct(grad):
        return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                       check_invariants=False)
    return grad.coalesce()


def _touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(rows, grad_rows)``: distinct touched rows (U,) and their summed gradient (U, d).

    ``grad_rows`` may share memory with ``grad``; callers must not modify it in place.
    """
    if not grad.is_sparse:
        # Dense path (compatibility): rows with any nonzero entry. Scans all N rows.
        rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)  # (U,)
        return rows, grad.index_select(0, rows)
    if grad.sparse_dim() == 1 and grad.dense_dim() == 1:
        # Row-sparse layout of F.embedding / F.embedding_bag: indices (1, nnz), values (nnz, d).
        if rows_are_distinct(grad):
            return grad._indices()[0], grad._values()
        return segment_sum(grad._indices()[0], grad._values())
    if grad.sparse_dim() == 2:
        # Element-sparse layout (e.g. Tensor.to_sparse()): coalesce sums duplicates and sorts
        # (row, col) pairs, so the rows come out grouped; scatter each into its row's slot.
        grad = grad.coalesce()
        row_of_entry, col_of_entry = grad._indices()  # (nnz,), (nnz,)
        rows, slot = torch.unique_consecutive(row_of_entry, return_inverse=True)
        dense_rows = grad._values().new_zeros(rows.numel(), grad.shape[1])
        dense_rows[slot, col_of_entry] = grad._values()
        return rows, dense_rows
    raise ValueError(
        f"SparseRowAdam: unsupported sparse gradient layout (sparse_dim={grad.sparse_dim()}, "
        f"dense_dim={grad.dense_dim()}); expected the row-sparse COO gradient of "
        "F.embedding(sparse=True) / F.embedding_bag(sparse=True)."
    )


def _clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """Scale factor min(1, max_norm / (total_norm + eps)), as in torch.nn.utils.clip_grad_norm_."""
    return (max_norm / (total_norm + _CLIP_EPS)).clamp(max=1.0)


def _validate_group(group: dict[str, Any]) -> None:
    """Check one parameter group's hyperparameters; errors name the argument."""
    lr = group["lr"]
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"SparseRowAdam: lr must be a finite float >= 0, got {lr!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"SparseRowAdam: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"SparseRowAdam: betas[{i}] must be in [0, 1), got {beta!r}")
    eps = group["eps"]
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"SparseRowAdam: eps must be a finite float >= 0, got {eps!r}")
    if not isinstance(group["rowwise_second_moment"], bool):
        raise ValueError(
            "SparseRowAdam: rowwise_second_moment must be a bool, "
            f"got {group['rowwise_second_moment']!r}"
        )
    max_norm = group["max_grad_norm"]
    if max_norm is not None and (
        not isinstance(max_norm, (int, float)) or not math.isfinite(max_norm) or max_norm <= 0
    ):
        raise ValueError(
            f"SparseRowAdam: max_grad_norm must be None or a finite float > 0, got {max_norm!r}"
        )
    if group.get("weight_decay", 0.0) != 0:
        raise ValueError(
            "SparseRowAdam: weight_decay must be 0 (the pool is trained without weight decay, "
            f"DESIGN.md §4), got {group['weight_decay']!r}"
        )


_KEEP_FLOATS = 1 << 26  # largest row buffer the update keeps between steps (256 MB in float32)


class SparseRowAdam(torch.optim.Optimizer):
    """Lazy Adam over the rows of 2-D tables, step cost O(rows touched); see the module docstring.

    Args:
        params: 2-D floating-point parameters (N, d), e.g. pool entries, or parameter groups.
        lr: learning rate (the pool has its own, usually higher than the controller's).
        betas: (beta1, beta2) decay rates of the first and second moments, each in [0, 1).
        eps: added to the bias-corrected root of the second moment, as in torch.optim.Adam.
        rowwise_second_moment: keep one second-moment scalar per row (mean of squared
            gradients over the row) instead of one per element.
        max_grad_norm: if set, before the update the summed row gradients of each parameter
            group are scaled so their joint L2 norm is at most this (the pool's own clipping;
            ``p.grad`` itself is left unchanged).
        weight_decay: accepted only as 0, so generic code that passes it gets a clear error.

    State per parameter (allocated when the parameter is added, so ``step`` never allocates a
    table): ``step`` int32 (N,), ``exp_avg`` (N, d), ``exp_avg_sq`` (N, d) or (N,) row-wise,
    all in the parameter's dtype except ``step``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rowwise_second_moment: bool = False,
        max_grad_norm: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            rowwise_second_moment=rowwise_second_moment,
            max_grad_norm=max_grad_norm,
            weight_decay=weight_decay,
        )
        _validate_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, check its hyperparameters and parameters, and allocate its state."""
        super().add_param_group(param_group)  # fills defaults, rejects duplicate params
        group = self.param_groups[-1]
        try:
            _validate_group(group)
            for p in group["params"]:
                if p.dim() != 2 or not p.is_floating_point() or p.is_sparse:
                    raise ValueError(
                        "SparseRowAdam: params must be dense 2-D floating-point tables (N, d); "
                        f"got shape {tuple(p.shape)}, dtype {p.dtype}, layout {p.layout}"
                    )
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        for p in group["params"]:
            self.state[p] = self._new_state(p, group["rowwise_second_moment"])

    @staticmethod
    def _new_state(p: Tensor, rowwise: bool) -> dict[str, Tensor]:
        num_rows = p.shape[0]
        return {
            "step": torch.zeros(num_rows, dtype=torch.int32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
            "exp_avg_sq": (
                torch.zeros(num_rows, dtype=p.dtype, device=p.device)
                if rowwise
                else torch.zeros_like(p, memory_format=torch.contiguous_format)
            ),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then check the state's shapes and put ``step`` on the param's device.

        torch casts floating state to the parameter's dtype and device but leaves a key named
        ``step`` where it was; ours is an int32 row tensor, so it is moved here.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p, group["rowwise_second_moment"]))
                    continue
                want_sq = (p.shape[0],) if group["rowwise_second_moment"] else tuple(p.shape)
                if tuple(state["exp_avg_sq"].shape) != want_sq:
                    raise ValueError(
                        "SparseRowAdam.load_state_dict: exp_avg_sq has shape "
                        f"{tuple(state['exp_avg_sq'].shape)}, expected {want_sq} for "
                        f"rowwise_second_moment={group['rowwise_second_moment']}"
                    )
                state["step"] = state["step"].to(device=p.device, dtype=torch.int32)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the touched rows of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            touched: list[tuple[Tensor, Tensor, Tensor]] = []  # (param, rows (U,), grad (U, d))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.shape != p.shape:
                    raise ValueError(
                        f"SparseRowAdam: gradient shape {tuple(p.grad.shape)} does not match "
                        f"parameter shape {tuple(p.shape)}"
                    )
                rows, grad_rows = _touched_rows(p.grad)
                if rows.numel() > 0:
                    touched.append((p, rows, grad_rows))
            if not touched:
                continue
            if group["max_grad_norm"] is not None:
                # Norm of the *summed* row gradients, i.e. of the true gradient of the table.
                norms = torch.stack([torch.linalg.vector_norm(g) for _, _, g in touched])
                coef = _clip_coef(torch.linalg.vector_norm(norms), group["max_grad_norm"])
                # Out of place: grad_rows may alias p.grad, which clipping must not modify.
                touched = [(p, rows, g * coef.to(g.dtype)) for p, rows, g in touched]
            for p, rows, grad_rows in touched:
                self._update_rows(p, self.state[p], rows, grad_rows, group)
        return loss

    def _rows(self, slot: str, like: Tensor, num_rows: int, width: int | None) -> Tensor:
        """A (num_rows, width) buffer, or (num_rows,) for width None, kept between steps.

        The update gathers the touched rows of the table and of both moments into these. On a CPU,
        gathering some 27k sorted rows of 256 floats into a fresh tensor each step took several times
        as long as into a reused one (a one-thread timing when this was written; no saved record).
        Not optimizer state: never saved, rebuilt on demand, grown by a
        quarter when a step touches more rows than any before. A buffer over ``_KEEP_FLOATS``
        elements is not kept (fresh each step), so a huge step does not pin its rows' memory.
        """
        tail = () if width is None else (width,)
        if num_rows * (width or 1) > _KEEP_FLOATS:
            return like.new_empty((num_rows,) + tail)
        workspace = self.__dict__.setdefault("_workspace", {})
        key = (slot, like.device, like.dtype, tail)
        buf = workspace.get(key)
        if buf is None or buf.shape[0] < num_rows:
            buf = like.new_empty((num_rows + num_rows // 4,) + tail)
            workspace[key] = buf
        return buf[:num_rows]

    def _update_rows(
        self, p: Tensor, state: dict[str, Tensor], rows: Tensor, grad: Tensor, group: dict[str, Any]
    ) -> None:
        """Adam on the rows ``rows`` (U,) of ``p`` with summed gradient ``grad`` (U, d).

        Every read is an ``index_select`` of rows into a reused buffer and every write an
        ``index_copy_``. With every row touched this is torch.optim.Adam's update up to rounding.
        On a CPU the rows go a cache-sized chunk at a time (`_chunk_rows`), so that the passes over
        the moments and the parameter rows run in a core's cache instead of memory; the update of a
        row does not depend on the others, so chunking changes no bit of the result.
        """
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        rowwise = group["rowwise_second_moment"]
        num_rows, width = grad.shape

        step = state["step"].index_select(0, rows).add_(1)  # (U,) int32
        state["step"].index_copy_(0, rows, step)
        # Per-row bias corrections, in float64 so beta**t stays accurate for large t.
        t = step.to(torch.float64)
        bias_correction1 = 1.0 - torch.pow(beta1, t)  # (U,)
        bias_correction2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt_()  # (U,)
        # Adam's  lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)  rewritten as
        #         (lr*sqrt(bc2)/bc1 * m) / (sqrt(v) + eps*sqrt(bc2)),
        # which folds both corrections into per-row factors and saves two passes over (U, d).
        step_size = (lr * bias_correction2_sqrt / bias_correction1).to(p.dtype).unsqueeze(1)  # (U, 1)
        eps_row = (eps * bias_correction2_sqrt).to(p.dtype).unsqueeze(1)  # (U, 1)

        chunk = _chunk_rows(p, width)
        for a in range(0, num_rows, chunk):
            b = min(num_rows, a + chunk)
            r, g = rows[a:b], grad[a:b]
            exp_avg = torch.index_select(state["exp_avg"], 0, r, out=self._rows("exp_avg", p, b - a, width))
            exp_avg.lerp_(g, 1.0 - beta1)
            state["exp_avg"].index_copy_(0, r, exp_avg)

            exp_avg_sq = torch.index_select(state["exp_avg_sq"], 0, r,
                                            out=self._rows("exp_avg_sq", p, b - a, None if rowwise else width))
            if rowwise:
                exp_avg_sq.mul_(beta2).add_(g.square().mean(dim=1), alpha=1.0 - beta2)
            else:
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            state["exp_avg_sq"].index_copy_(0, r, exp_avg_sq)

            denom = exp_avg_sq.sqrt_()  # the state is already written back: reuse the buffer
            if rowwise:
                denom = denom.unsqueeze(1)  # (c, 1), broadcast over the row
            denom.add_(eps_row[a:b])
            exp_avg.mul_(step_size[a:b])  # likewise reused; now the numerator of the update
            # Gather, update, scatter: measured faster on CPU than p.index_add_(0, rows, -update).
            rows_of_p = torch.index_select(p, 0, r, out=self._rows("param", p, b - a, width))
            p.index_copy_(0, r, rows_of_p.addcdiv_(exp_avg, denom, value=-1.0))


_CPU_CHUNK_FLOATS = 1 << 18  # floats per row buffer on a CPU (1 MB in float32): three of them stay in cache


def _chunk_rows(p: Tensor, width: int) -> int:
    """Rows per chunk of the update: cache-sized on a CPU, where the (U, d) passes were memory-bound
    (micro at 2^20 entries touches ~44k rows of 256 floats a step, 45 MB per buffer); every row at
    once on an accelerator, where each chunk would cost kernel launches instead."""
    if p.device.type != "cpu":
        return 1 << 62
    return max(1, _CPU_CHUNK_FLOATS // max(1, width))


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the joint L2 norm of dense and sparse COO gradients in place; return the norm.

    Like ``torch.nn.utils.clip_grad_norm_`` (2-norm, coefficient max_norm / (norm + 1e-6),
    never scaling up), but sparse gradients are coalesced first and stored back in ``p.grad``:
    an embedding's sparse gradient repeats a row once per lookup, and the norm of the gradient
    is the norm of the *summed* rows, not of the listed entries. Cost is O(nnz log nnz) for a
    sparse gradient and O(numel) for a dense one. A non-finite norm propagates into the
    gradients, as in torch's default (``error_if_nonfinite=False``).
    """
    if not isinstance(max_norm, (int, float)) or not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be a finite float > 0, got {max_norm!r}")
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads: list[Tensor] = []  # tensors whose in-place scaling scales each gradient
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads])
    total_norm = torch.linalg.vector_norm(norms)
    coef = _clip_coef(total_norm, max_norm)
    for g in grads:
        g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return total_norm
