"""Coordinate retrieval: one window of K contiguous rows per head, Gaussian weights with gradients
to μ and σ, O(K) cost whatever N, and a quantile warp that keeps windows from collapsing."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_dpsnr import DPSNRForCausalLM
from modeling_dpsnr.kinds import stripe_bounds
from modeling_dpsnr.retrieval import CoordinateRetriever, PoolPartition

from conftest import tiny_config, tiny_model

K = 5


def _config(num_entries=1000, **overrides):
    kwargs = dict(pool_retrieval="coordinate", indexer_window=K, pool_size=num_entries, pool_partitions={"p": 1.0},
                  pool_entry="value", pool_heads=3)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def _retriever(num_entries=1000, seed=0, **overrides):
    torch.manual_seed(seed)
    r = CoordinateRetriever(_config(num_entries, **overrides), num_entries)
    torch.nn.init.normal_(r.indexer[2].weight, std=0.5)  # spread positions and widths
    return r


def test_rows_read_are_exactly_the_window_around_mu_inside_the_head_stripe():
    r = _retriever(1000).eval()
    x = torch.randn(64, 32)
    out = r(x)
    raw = r.indexer(x).view(64, r.heads, 2)
    for h, (lo, hi) in enumerate(stripe_bounds(1000, r.heads)):
        mu = torch.sigmoid(raw[:, h, 0]) * (hi - lo - 1)  # warp is the identity before any training
        sigma = r.min_sigma + F.softplus(raw[:, h, 1])
        start = (mu.floor() - K // 2).clamp(0, hi - lo - K) + lo
        expected = start.long()[:, None] + torch.arange(K)
        assert torch.equal(out.indices[:, h], expected)
        assert out.indices[:, h].min() >= lo and out.indices[:, h].max() < hi
        gauss = torch.exp(-0.5 * ((expected - lo - mu[:, None]) / sigma[:, None]) ** 2)
        torch.testing.assert_close(out.weights[:, h], gauss / gauss.sum(-1, keepdim=True))


def test_gradients_reach_mu_sigma_and_only_the_window_rows():
    torch.manual_seed(0)
    cfg = _config(600)
    part = PoolPartition(cfg, "p", 600)
    torch.nn.init.normal_(part.v)
    torch.nn.init.normal_(part.retriever.indexer[2].weight, std=0.5)
    x = torch.randn(4, 32)
    out, r = part(x, x)
    out.pow(2).sum().backward()
    last = part.retriever.indexer[2].weight.grad.view(cfg.pool_heads, 2, -1)  # (H, μ|σ, hidden)
    assert (last[:, 0].abs().sum(-1) > 0).all(), "no gradient to μ"
    assert (last[:, 1].abs().sum(-1) > 0).all(), "no gradient to σ"
    touched = set((part.v.grad.abs().sum(-1) > 0).nonzero().squeeze(-1).tolist())
    assert touched == set(r.indices.flatten().tolist())


class _Ops(TorchDispatchMode):
    """Largest tensor any op creates, and the number of ops."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_cost_does_not_grow_with_the_pool():
    probes = []
    for n in (1 << 10, 1 << 22):  # 4M rows × 4 floats: the table exists, the forward never scans it
        torch.manual_seed(0)
        part = PoolPartition(_config(n, hidden_size=32), "p", n)
        part.v.data = torch.zeros(n, 32)
        x = torch.randn(3, 32)
        with torch.no_grad(), _Ops() as probe:
            part(x, x)
        probes.append((probe.max_numel, probe.ops))
    assert probes[0] == probes[1], probes  # same ops, same largest tensor, for 4096× more rows
    assert probes[1][0] < (1 << 22) // 100  # bounded by the indexer's own weights, nowhere near N


def test_quantile_warp_starts_as_identity_is_monotone_and_equalises():
    r = _retriever(3000, indexer_balance_momentum=0.2)
    p = torch.rand(1000, r.heads)
    torch.testing.assert_close(r.equalise(p), p)  # fresh histogram: identity
    bunched = lambda n: (0.3 + 0.05 * torch.randn(n, r.heads)).clamp(0, 1)  # a collapsing indexer
    for _ in range(30):
        r._record_positions(bunched(400), None)
    grid = torch.linspace(0, 1, 101)[:, None].expand(101, r.heads)
    assert (r.equalise(grid).diff(dim=0) > 0).all()  # strictly increasing: nearby queries stay nearby
    fresh = bunched(4000)
    ks_before, ks_after = _ks_to_uniform(fresh), _ks_to_uniform(r.equalise(fresh))
    # uniform up to the share of uniform mass mixed in (and the histogram's sampling noise)
    assert ks_after < r.UNIFORM_FLOOR + 0.03 and ks_before > 0.4, (ks_before, ks_after)


def _ks_to_uniform(p: torch.Tensor) -> float:
    s = p.sort(0).values
    ecdf = torch.arange(1, s.shape[0] + 1)[:, None] / s.shape[0]
    return float((ecdf - s).abs().max())


def _utilisation(r, x):
    counts = torch.zeros(r.num_entries)
    idx = r.eval()(x).indices.flatten()
    counts.index_add_(0, idx, torch.ones(idx.numel()))
    p = counts / counts.sum()
    nz = p[p > 0]
    return float((counts > 0).float().mean()), float((nz * (nz * r.num_entries).log()).sum())


def test_quantile_warp_spreads_collapsed_windows():
    torch.manual_seed(1)
    centre = torch.randn(1, 32)
    data = lambda n: centre + 0.05 * torch.randn(n, 32)  # near-identical queries: windows pile up
    plain = _retriever(6000, seed=3, indexer_balance="none")
    balanced = _retriever(6000, seed=3, indexer_balance="quantile")
    balanced.indexer.load_state_dict(plain.indexer.state_dict())
    balanced.train()
    for _ in range(100):  # training-mode forwards update the histogram; no optimiser involved
        balanced(data(256))
    held_out = data(2000)
    rows_before, kl_before = _utilisation(plain, held_out)
    rows_after, kl_after = _utilisation(balanced, held_out)
    assert rows_after > 3 * rows_before and kl_after < kl_before - 1.0, (rows_before, rows_after, kl_before, kl_after)


def test_padding_does_not_move_the_histogram():
    r = _retriever(1000).train()
    x = torch.randn(6, 32)
    r(x, token_mask=torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(r.position_histogram, torch.full_like(r.position_histogram, 1 / r.bins))
    r(x, token_mask=torch.tensor([True, False, True, False, False, False]))
    assert not torch.allclose(r.position_histogram, torch.full_like(r.position_histogram, 1 / r.bins))


def test_coordinate_model_eager_equals_static_and_survives_save_load(tmp_path):
    model = tiny_model(pool_retrieval="coordinate", indexer_window=4, pool_size=400, loop_halt_bias_init=0.0).train()
    ids = torch.randint(0, 97, (2, 6))
    model(ids, labels=ids).loss.backward()  # one training forward: histograms move off uniform
    model.eval()
    eager = model(ids).logits
    model.set_execution(loop_mode="static")
    torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=1e-4)
    model.set_execution(loop_mode="auto")
    model.save_pretrained(tmp_path)
    for loaded in (DPSNRForCausalLM.from_pretrained(tmp_path), DPSNRForCausalLM.from_pretrained(tmp_path, pool_mmap=True)):
        for name, part in model.pool.partitions.items():
            a, b = part.retriever, loaded.pool[name].retriever
            assert torch.equal(a.stripe_start, b.stripe_start) and torch.equal(a.stripe_size, b.stripe_size)
            assert torch.equal(a.position_histogram, b.position_histogram)
        torch.testing.assert_close(loaded(ids).logits, eager)


@pytest.mark.parametrize("bad", [dict(indexer_balance="kmeans"), dict(indexer_balance_bins=0),
                                 dict(indexer_balance_momentum=0.0)])
def test_balance_settings_are_validated(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        _config(**bad)
