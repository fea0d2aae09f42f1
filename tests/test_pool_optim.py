"""SparseRowAdam and clip_grad_norm_: agreement with simple references, sparsity guarantees.

The reference for the sparse path is a plain Python loop of lazy Adam (Kingma & Ba 2015) with
one step counter per row; the dense reference is torch.optim.Adam (STYLE.md habit 5).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpsnr.training.pool_optim import SparseRowAdam, clip_grad_norm_

# Building COO tensors from raw indices warns about disabled invariant checks; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

LR, BETAS, EPS = 0.1, (0.8, 0.95), 1e-8


def row_sparse(index: list[int], values: Tensor, num_rows: int) -> Tensor:
    """Uncoalesced row-sparse COO gradient, the layout F.embedding(sparse=True) produces."""
    return torch.sparse_coo_tensor(torch.tensor([index]), values, (num_rows, values.shape[1]))


class LazyAdamReference:
    """Lazy Adam written as a loop over rows: sum duplicates, then Adam with per-row step."""

    def __init__(self, table: Tensor, rowwise: bool) -> None:
        self.p = table.clone()
        n, d = table.shape
        self.m = torch.zeros(n, d, dtype=table.dtype)
        self.v = torch.zeros(n, dtype=table.dtype) if rowwise else torch.zeros(n, d, dtype=table.dtype)
        self.t = [0] * n
        self.rowwise = rowwise

    def step(self, index: list[int], values: Tensor, scale: float = 1.0) -> None:
        summed: dict[int, Tensor] = {}
        for r, g in zip(index, values):
            summed[r] = summed.get(r, 0) + g
        b1, b2 = BETAS
        for r, g in summed.items():
            g = g * scale
            self.t[r] += 1
            self.m[r] = b1 * self.m[r] + (1 - b1) * g
            g2 = (g * g).mean() if self.rowwise else g * g
            self.v[r] = b2 * self.v[r] + (1 - b2) * g2
            m_hat = self.m[r] / (1 - b1 ** self.t[r])
            v_hat = self.v[r] / (1 - b2 ** self.t[r])
            self.p[r] = self.p[r] - LR * m_hat / (v_hat.sqrt() + EPS)


# Row 0 and 9 are never touched; row 7 first appears at the third step; 3 and 5 repeat.
STEPS = [[3, 5, 3, 1, 5, 5], [1, 2, 3, 3], [7, 3, 2, 7]]


@pytest.mark.parametrize("rowwise", [False, True])
def test_matches_lazy_adam_reference_and_untouched_rows_stay_bit_identical(rowwise: bool) -> None:
    torch.manual_seed(0)
    n, d = 10, 4
    table = nn.Parameter(torch.randn(n, d, dtype=torch.float64))
    before = table.detach().clone()
    ref = LazyAdamReference(before, rowwise)
    opt = SparseRowAdam([table], lr=LR, betas=BETAS, eps=EPS, rowwise_second_moment=rowwise)
    state = opt.state[table]
    for index in STEPS:
        values = torch.randn(len(index), d, dtype=torch.float64)
        table.grad = row_sparse(index, values, n)
        opt.step()
        ref.step(index, values)
        torch.testing.assert_close(table.detach(), ref.p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["exp_avg"], ref.m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["exp_avg_sq"], ref.v, rtol=1e-12, atol=1e-12)
        assert state["step"].tolist() == ref.t

    for r in (0, 9):  # never touched: parameter and every state buffer exactly as before
        assert torch.equal(table.detach()[r], before[r])
        assert torch.equal(state["exp_avg"][r], torch.zeros_like(state["exp_avg"][r]))
        assert torch.equal(state["exp_avg_sq"][r], torch.zeros_like(state["exp_avg_sq"][r]))
        assert state["step"][r] == 0
    # Per-row bias correction: row 7, first touched at global step 3, got Adam's *first* step,
    # whose size is lr per element (not the ~(1 - b1)·lr of a per-tensor step count).
    if not rowwise:
        torch.testing.assert_close((table.detach()[7] - before[7]).abs(), torch.full((d,), LR, dtype=torch.float64))


@pytest.mark.parametrize("rowwise", [False, True])
def test_tables_sharing_the_row_buffers_match_the_reference_as_touched_rows_grow_and_shrink(rowwise: bool) -> None:
    # The update gathers rows into buffers kept between steps and shared by tables of one width:
    # a step touching more rows than any before grows them, a smaller one uses a prefix.
    torch.manual_seed(1)
    n, d = 12, 3
    tables = [nn.Parameter(torch.randn(n, d, dtype=torch.float64)) for _ in range(2)]
    refs = [LazyAdamReference(t.detach().clone(), rowwise) for t in tables]
    opt = SparseRowAdam(tables, lr=LR, betas=BETAS, eps=EPS, rowwise_second_moment=rowwise)
    steps = [([4], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11], [2, 2]), ([5, 1], [11, 0, 3])]
    for per_table in steps:
        for table, ref, index in zip(tables, refs, per_table):
            values = torch.randn(len(index), d, dtype=torch.float64)
            table.grad = row_sparse(index, values, n)
            ref.step(index, values)
        opt.step()
        for table, ref in zip(tables, refs):
            torch.testing.assert_close(table.detach(), ref.p, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[table]["exp_avg"], ref.m, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[table]["exp_avg_sq"], ref.v, rtol=1e-12, atol=1e-12)
    assert "_workspace" not in opt.state_dict()["state"] and set(opt.state_dict()["state"]) == {0, 1}


@pytest.mark.parametrize("rowwise", [False, True])
def test_an_update_in_row_chunks_equals_the_update_in_one_bit_for_bit(rowwise: bool, monkeypatch) -> None:
    # On a CPU the touched rows are updated a cache-sized chunk at a time; here chunks of 2 rows of a
    # 3-wide table against a single chunk, over steps touching 1 to 9 rows (a partial last chunk).
    import dpsnr.training.pool_optim as pool_optim

    torch.manual_seed(2)
    n, d = 12, 3
    start = torch.randn(n, d, dtype=torch.float64)
    results = []
    for chunk_floats in (2 * d, 1 << 62):
        monkeypatch.setattr(pool_optim, "_CPU_CHUNK_FLOATS", chunk_floats)
        assert pool_optim._chunk_rows(start, d) == (2 if chunk_floats == 2 * d else chunk_floats // d)
        table = nn.Parameter(start.clone())
        opt = SparseRowAdam([table], lr=LR, betas=BETAS, eps=EPS, rowwise_second_moment=rowwise)
        gen = torch.Generator().manual_seed(3)
        for index in ([4], [0, 1, 2, 3, 4, 5, 6, 7, 8, 8], [11, 2, 5, 9, 9, 1]):
            table.grad = row_sparse(index, torch.randn(len(index), d, dtype=torch.float64, generator=gen), n)
            opt.step()
        results.append((table.detach().clone(), {k: v.clone() for k, v in opt.state[table].items()}))
    (p_chunked, s_chunked), (p_whole, s_whole) = results
    assert torch.equal(p_chunked, p_whole) and not torch.equal(p_whole, start)
    assert all(torch.equal(s_chunked[k], s_whole[k]) for k in s_whole)


@pytest.mark.parametrize("rowwise", [False, True])
def test_duplicate_rows_are_summed_not_overwritten(rowwise: bool) -> None:
    a = torch.tensor([[2.0, -1.0, 0.5]])
    c = torch.tensor([[-1.0, 3.0, 0.5]])
    b = torch.tensor([[0.3, 0.3, 0.3]])
    init = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))

    def one_step(index: list[int], values: Tensor) -> Tensor:
        table = nn.Parameter(init.clone())
        opt = SparseRowAdam([table], lr=LR, betas=BETAS, rowwise_second_moment=rowwise)
        table.grad = row_sparse(index, values, 5)
        opt.step()
        return table.detach()

    duplicated = one_step([3, 1, 3], torch.cat([a, b, c]))
    summed = one_step([3, 1], torch.cat([a + c, b]))
    last_write_wins = one_step([3, 1], torch.cat([c, b]))
    torch.testing.assert_close(duplicated, summed)
    assert not torch.allclose(duplicated[3], last_write_wins[3])


@pytest.mark.parametrize("grad_layout", ["row_sparse", "element_sparse", "dense"])
def test_matches_torch_adam_when_every_row_is_touched(grad_layout: str) -> None:
    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(6, 5))
    theirs = nn.Parameter(ours.detach().clone())
    opt = SparseRowAdam([ours], lr=LR, betas=BETAS, eps=EPS)
    adam = torch.optim.Adam([theirs], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    for _ in range(5):
        grad = torch.randn(6, 5)
        ours.grad = {
            "row_sparse": lambda: grad.to_sparse(sparse_dim=1),
            "element_sparse": lambda: grad.to_sparse(),
            "dense": lambda: grad.clone(),
        }[grad_layout]()
        theirs.grad = grad.clone()
        opt.step()
        adam.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], adam.state[theirs]["exp_avg_sq"])


def test_dense_gradient_rows_of_zeros_count_as_untouched() -> None:
    table = nn.Parameter(torch.randn(4, 3))
    before = table.detach().clone()
    opt = SparseRowAdam([table], lr=LR)
    grad = torch.zeros(4, 3)
    grad[2] = torch.tensor([0.0, 1.0, -2.0])  # one nonzero row
    table.grad = grad
    opt.step()
    changed = (table.detach() != before).any(dim=1).tolist()
    assert changed == [False, False, True, False]
    assert opt.state[table]["step"].tolist() == [0, 0, 1, 0]


def test_rowwise_second_moment_keeps_one_scalar_per_row() -> None:
    n, d = 7, 16
    full = SparseRowAdam([nn.Parameter(torch.zeros(n, d))])
    rowwise = SparseRowAdam([nn.Parameter(torch.zeros(n, d))], rowwise_second_moment=True)
    (full_state,) = full.state.values()
    (row_state,) = rowwise.state.values()
    assert full_state["exp_avg_sq"].shape == (n, d)
    assert row_state["exp_avg_sq"].shape == (n,)
    assert row_state["exp_avg"].shape == (n, d)
    assert row_state["step"].shape == (n,) and row_state["step"].dtype == torch.int32


def test_max_grad_norm_equals_manual_scaling() -> None:
    torch.manual_seed(0)
    max_norm = 0.5
    # Adam is nearly scale-invariant in one step, so clipping shows over steps of unequal norm:
    # the first gradient is clipped, the second is below max_norm and left alone.
    grads = [
        ([1, 3, 1], torch.randn(3, 4) * 10, [0, 0], torch.randn(2, 2) * 10),
        ([3, 2], torch.randn(2, 4) * 0.01, [1], torch.randn(1, 2) * 0.01),
    ]

    def run(clip: float | None, scales: list[float]) -> list[Tensor]:
        a = nn.Parameter(torch.ones(5, 4))
        b = nn.Parameter(torch.ones(3, 2))
        opt = SparseRowAdam([a, b], lr=LR, betas=BETAS, max_grad_norm=clip)
        for (ia, va, ib, vb), s in zip(grads, scales):
            # b's gradient arrives coalesced: the optimizer then reads its values without a copy.
            a.grad, b.grad = row_sparse(ia, va * s, 5), row_sparse(ib, vb * s, 3).coalesce()
            grads_before = [a.grad.to_dense(), b.grad.to_dense()]
            opt.step()
            for p, before in zip((a, b), grads_before):  # p.grad itself is not clipped
                assert torch.equal(p.grad.to_dense(), before)
        return [a.detach(), b.detach()]

    scales = []
    for ia, va, ib, vb in grads:
        norm = torch.cat([row_sparse(ia, va, 5).to_dense().flatten(), row_sparse(ib, vb, 3).to_dense().flatten()]).norm()
        scales.append(min(1.0, max_norm / (norm.item() + 1e-6)))
    assert scales[0] < 1.0 and scales[1] == 1.0
    clipped, manual, unclipped = run(max_norm, [1.0, 1.0]), run(None, scales), run(None, [1.0, 1.0])
    for x, y in zip(clipped, manual):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(clipped[0], unclipped[0])


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_grad_norm_handles_mixed_dense_and_sparse(max_norm: float) -> None:
    torch.manual_seed(0)
    dense = nn.Parameter(torch.zeros(3, 2))
    pool = nn.Parameter(torch.zeros(6, 2))
    dense.grad = torch.randn(3, 2)
    # Row 4 listed twice with the same direction: summing first changes the norm.
    pool.grad = row_sparse([4, 1, 4], torch.tensor([[1.0, 2.0], [0.5, 0.5], [1.0, 2.0]]), 6)
    dense_before, pool_before = dense.grad.clone(), pool.grad.to_dense()
    expected = torch.cat([dense_before.flatten(), pool_before.flatten()]).norm()

    total = clip_grad_norm_([dense, pool], max_norm)

    torch.testing.assert_close(total, expected)
    coef = min(1.0, max_norm / (expected.item() + 1e-6))
    torch.testing.assert_close(dense.grad, dense_before * coef)
    torch.testing.assert_close(pool.grad.to_dense(), pool_before * coef)
    assert pool.grad.is_sparse
    if max_norm < expected:
        clipped = torch.cat([dense.grad.flatten(), pool.grad.to_dense().flatten()]).norm()
        torch.testing.assert_close(clipped, torch.tensor(max_norm), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "lookup, rowwise, clip",
    [("embedding", False, None), ("embedding_bag", True, None), ("embedding_bag", False, 1.0)],
)
def test_trains_sparse_embeddings_end_to_end(lookup: str, rowwise: bool, clip: float | None) -> None:
    torch.manual_seed(0)
    num_rows, d, batch, bag = 50, 8, 16, 4
    table = nn.Embedding(num_rows, d, sparse=True)
    unused = 49  # never looked up: must not move
    before = table.weight.detach().clone()
    opt = SparseRowAdam(table.parameters(), lr=0.05, rowwise_second_moment=rowwise, max_grad_norm=clip)
    ids = torch.randint(0, 40, (batch, bag))  # duplicates within and across bags
    weights = torch.rand(batch, bag)
    target = torch.randn(batch, d)
    losses = []
    for _ in range(60):
        if lookup == "embedding":
            out = (table(ids) * weights.unsqueeze(-1)).sum(1)  # (batch, d)
        else:
            out = F.embedding_bag(ids, table.weight, mode="sum", sparse=True, per_sample_weights=weights)
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        assert table.weight.grad.is_sparse
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal(table.weight.detach()[unused], before[unused])


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    grads = [(list(torch.randint(0, 8, (6,)).tolist()), torch.randn(6, 3)) for _ in range(4)]
    a = nn.Parameter(torch.randn(8, 3))
    b = nn.Parameter(a.detach().clone())
    opt_a = SparseRowAdam([a], lr=LR, rowwise_second_moment=True)
    for index, values in grads[:2]:
        a.grad = row_sparse(index, values, 8)
        opt_a.step()
    b.data.copy_(a.detach())
    opt_b = SparseRowAdam([b], lr=LR, rowwise_second_moment=True)
    # torch's state_dict() holds references to the live state; a copy stands in for save/load.
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for index, values in grads[2:]:
        a.grad, b.grad = row_sparse(index, values, 8), row_sparse(index, values, 8)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach(), b.detach())
    # A state dict whose group flag disagrees with its buffers is rejected when loaded.
    inconsistent = copy.deepcopy(opt_a.state_dict())
    inconsistent["param_groups"][0]["rowwise_second_moment"] = False
    with pytest.raises(ValueError, match="rowwise_second_moment"):
        SparseRowAdam([nn.Parameter(torch.zeros(8, 3))]).load_state_dict(inconsistent)


def test_empty_sparse_gradient_changes_nothing() -> None:
    table = nn.Parameter(torch.randn(4, 3))
    before = table.detach().clone()
    opt = SparseRowAdam([table])
    table.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (4, 3))
    opt.step()
    assert torch.equal(table.detach(), before)
    assert int(opt.state[table]["step"].sum()) == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"rowwise_second_moment": "yes"}, "rowwise_second_moment"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"weight_decay": 0.01}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    table = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=name):
        SparseRowAdam([table], **kwargs)
    with pytest.raises(ValueError, match=name):  # the same check applies to a group override
        SparseRowAdam([{"params": [table], **kwargs}])
    opt = SparseRowAdam([table])
    with pytest.raises(ValueError, match=name):  # ... and to a group added later, which is not kept
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 3))], **kwargs})
    assert len(opt.param_groups) == 1 and len(opt.state) == 1


def test_bad_parameters_and_max_norm_raise() -> None:
    with pytest.raises(ValueError, match="2-D"):
        SparseRowAdam([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([nn.Parameter(torch.zeros(2))], 0.0)
