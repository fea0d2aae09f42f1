"""Pool retrieval and reads: product keys are exact, cost O(√N), and gradients touch only read rows."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_dpsnr.kinds import product_key_sizes
from modeling_dpsnr.reads import weighted_row_sum
from modeling_dpsnr.retrieval import ExhaustiveRetriever, PoolPartition, ProductKeyRetriever

from conftest import tiny_config, tiny_model


def _retriever(num_entries, exhaustive=False, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(pool_size=max(num_entries, 10), pool_partitions={"p": 1.0}, **overrides)
    r = (ExhaustiveRetriever if exhaustive else ProductKeyRetriever)(cfg, num_entries)
    torch.nn.init.normal_(r.sub_keys1)
    torch.nn.init.normal_(r.sub_keys2)
    torch.nn.init.normal_(r.query.weight, std=0.3)
    return r


@pytest.mark.parametrize("num_entries", [10, 16, 37, 300, 1000, 1031])
def test_product_key_topk_equals_exhaustive(num_entries):
    fast = _retriever(num_entries)
    ref = _retriever(num_entries, exhaustive=True)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(64, fast.query.in_features)
    a, b = fast(x), ref(x)
    assert a.indices.max() < num_entries and a.indices.min() >= 0
    sa, ia = a.indices.sort(-1)
    sb, ib = b.indices.sort(-1)
    assert torch.equal(sa, sb)
    torch.testing.assert_close(a.weights.gather(-1, ia), b.weights.gather(-1, ib))


@pytest.mark.parametrize("num_entries", [300, 1031])
def test_retrieval_without_autograd_reads_the_chosen_scores_off_the_selection(num_entries):
    # Training recomputes the chosen entries' scores from their sub-keys (for their gradients); without
    # autograd they are gathered from the selection's scores: the same weights, full rows or a partial last row.
    r = _retriever(num_entries)
    x = torch.randn(32, r.query.in_features, requires_grad=True)
    out = r(x)
    assert out.weights.requires_grad
    with torch.no_grad():
        no_grad = r(x)
    assert torch.equal(no_grad.indices, out.indices)
    torch.testing.assert_close(no_grad.weights, out.weights)


def test_product_key_sizes_leave_at_most_one_partial_row():
    for n in [1, 2, 7, 100, 101, 70000, 48_828_125]:
        n1, n2 = product_key_sizes(n)
        assert n1 * n2 >= n and n1 * n2 - n < n2


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_product_key_retrieval_never_scores_the_whole_pool():
    # One token, a 1M-entry partition: every tensor the retrieval creates must be ~√N, not N.
    num_entries = 1_000_000
    r = _retriever(num_entries)
    x = torch.randn(1, r.query.in_features)
    with torch.no_grad(), _MaxNumel() as probe:
        out = r(x)
    assert out.indices.shape == (1, r.heads, r.topk)
    assert probe.max_numel < 20 * r.heads * (r.n1 + r.n2), probe.max_numel
    with torch.no_grad(), _MaxNumel() as probe_ref:
        _retriever(num_entries, exhaustive=True)(x)
    assert probe_ref.max_numel >= num_entries  # the reference really is O(N): the probe can fail


def _partition(entry="neuron", sparse=False, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(pool_entry=entry, pool_size=200, pool_partitions={"p": 1.0})
    part = PoolPartition(cfg, "p", 200)
    part.sparse_grads = sparse
    for t in part.entry_tables().values():
        torch.nn.init.normal_(t, std=0.5)
    torch.nn.init.normal_(part.retriever.sub_keys1)
    torch.nn.init.normal_(part.retriever.sub_keys2)
    return cfg, part


@pytest.mark.parametrize("entry", ["neuron", "value"])
def test_gradients_reach_only_the_rows_that_were_read(entry):
    cfg, part = _partition(entry)
    x = torch.randn(5, cfg.hidden_size)
    out, r = part(x, x)
    out.pow(2).sum().backward()
    read = torch.zeros(200, dtype=torch.bool)
    read[r.indices.flatten()] = True
    for name, table in part.entry_tables().items():
        touched = table.grad.abs().sum(-1) > 0
        assert touched[~read].sum() == 0, f"{name}: gradient on rows never read"
        assert touched[read].any()
    # the retrieval modules learn too: query projection and both sub-key tables
    assert part.retriever.query.weight.grad.abs().sum() > 0
    assert part.retriever.sub_keys1.grad.abs().sum() > 0 and part.retriever.sub_keys2.grad.abs().sum() > 0


@pytest.mark.parametrize("entry", ["neuron", "value"])
def test_sparse_gradients_equal_dense_ones(entry):
    cfg, dense = _partition(entry, sparse=False)
    _, sparse = _partition(entry, sparse=True)
    x = torch.randn(6, cfg.hidden_size)
    for part in (dense, sparse):
        out, _ = part(x, x)
        out.sum().backward()
    for name, table in sparse.entry_tables().items():
        assert table.grad.is_sparse
        torch.testing.assert_close(table.grad.to_dense(), dense.entry_tables()[name].grad)


def test_embedding_bag_and_gather_paths_agree():
    table = torch.randn(50, 8, requires_grad=True)
    idx = torch.randint(0, 50, (7, 6))
    coef = torch.randn(7, 6)
    a = weighted_row_sum(table, idx, coef, sparse=False, use_bag=True)
    b = weighted_row_sum(table, idx, coef, sparse=False, use_bag=False)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a.sum(), table)
    gb, = torch.autograd.grad(b.sum(), table)
    torch.testing.assert_close(ga, gb)


def test_duplicate_rows_accumulate_gradient():
    table = torch.zeros(4, 3, requires_grad=True)
    idx = torch.tensor([[2, 2, 1]])
    coef = torch.tensor([[1.0, 2.0, 1.0]])
    weighted_row_sum(table, idx, coef, sparse=False, use_bag=True).sum().backward()
    assert table.grad[2].tolist() == [3.0, 3.0, 3.0]  # summed, not last-write-wins


def test_usage_tracking_counts_reads_and_weight_mass():
    model = tiny_model()
    cfg, pool = model.config, model.pool
    x = torch.randn(9, cfg.hidden_size)
    with pool.track_usage() as usage:
        pool("knowledge", x, x)
        pool("knowledge", x, x, token_mask=torch.arange(9) < 4)
    counts, mass = usage["knowledge"]["counts"], usage["knowledge"]["mass"]
    assert int(counts.sum()) == (9 + 4) * cfg.pool_heads * cfg.pool_topk
    torch.testing.assert_close(mass.sum(), torch.tensor(float((9 + 4) * cfg.pool_heads)))
    assert usage["grammar"]["counts"].sum() == 0
    assert pool._usage is None  # tracking ends with the context


def test_balance_bias_spreads_selection_without_changing_weights():
    torch.manual_seed(0)
    cfg = tiny_config(pool_size=400, pool_partitions={"p": 1.0}, pool_balance="bias", pool_balance_rate=0.05)
    r = ProductKeyRetriever(cfg, 400).train()
    torch.nn.init.normal_(r.sub_keys1)
    torch.nn.init.normal_(r.sub_keys2)
    x = torch.randn(256, cfg.hidden_size) * 0.1 + torch.randn(1, cfg.hidden_size)  # similar queries
    before = r(x).indices.unique().numel()
    for _ in range(50):
        r(x)
    after = r(x).indices.unique().numel()
    assert after > before * 1.5, (before, after)
    assert r.balance_bias1.abs().sum() > 0
    # weights are a softmax of the unbiased scores of the chosen entries
    r.eval()
    out = r(x[:3])
    assert torch.allclose(out.weights.sum(-1), torch.ones(3, cfg.pool_heads))


# ---------------------------------------------------------------------------- query / key normalisation
def _running_norm_model(**kw):
    return tiny_model(pool_query_norm="running", pool_key_norm="unit", **kw)


def test_running_query_norm_is_causal_in_training_and_at_inference():
    """The statistics a batch is normalised with come from earlier batches only: changing token t
    changes no retrieval (hence no logit) of an earlier token, in training mode too."""
    ids, earlier = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    for mode in ("train", "eval"):
        outs = []
        for batch in (ids, changed):
            model = _running_norm_model().train()
            model(earlier)  # an earlier batch calibrates the statistics
            model.train(mode == "train")
            outs.append(model(batch).logits)
        torch.testing.assert_close(outs[0][:, :7], outs[1][:, :7], msg=mode)
        assert not torch.allclose(outs[0][:, 7:], outs[1][:, 7:])


def test_running_query_norm_ignores_padding():
    real = torch.randint(1, 97, (1, 8))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), real], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    a, b = _running_norm_model().train(), _running_norm_model().train()
    for _ in range(2):  # the second forward folds the first one's statistics in
        out_a = a(real, labels=real)
        out_b = b(padded, attention_mask=mask)
    torch.testing.assert_close(out_b.logits[:, 4:], out_a.logits, atol=1e-5, rtol=1e-4)
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        if "running" in name:
            torch.testing.assert_close(x, y, msg=name)
    norm = a.pool["knowledge"].retriever.query_norm
    assert bool(norm.calibrated) and not torch.equal(norm.running_var, torch.ones_like(norm.running_var))


@pytest.mark.parametrize("loop_step", ["token", "block"])
def test_running_query_norm_eager_equals_static(loop_step):
    models = []
    for mode in ("eager", "static"):
        m = _running_norm_model(loop_step=loop_step, loop_halt_bias_init=0.0, execution={"loop_mode": mode}).train()
        torch.nn.init.normal_(m.model.loop.policy.halt.weight, std=0.5)
        models.append(m)
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 97, (3, 10))
    outs = [[m(ids, labels=ids) for _ in range(2)][-1] for m in models]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-4)
    for (name, x), (_, y) in zip(models[0].named_buffers(), models[1].named_buffers()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def test_unit_keys_make_scores_independent_of_key_norm():
    torch.manual_seed(0)
    cfg = tiny_config(pool_key_norm="unit", pool_size=200, pool_partitions={"p": 1.0})
    r = ProductKeyRetriever(cfg, 200)
    torch.nn.init.normal_(r.sub_keys1)
    torch.nn.init.normal_(r.sub_keys2)
    x = torch.randn(5, cfg.hidden_size)
    before = r(x)
    with torch.no_grad():
        r.sub_keys1.mul_(torch.rand(r.sub_keys1.shape[:2]).unsqueeze(-1) * 10 + 0.1)  # rescale every key
    after = r(x)
    assert torch.equal(before.indices, after.indices)
    torch.testing.assert_close(before.weights, after.weights)


# ---------------------------------------------------------------------------- fused neuron reads
@pytest.mark.parametrize("entry", ["neuron", "value"])
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_read_equals_the_plain_read_including_every_gradient(entry, sparse, monkeypatch):
    import modeling_dpsnr.reads as reads

    monkeypatch.setattr(reads, "CHUNK_FLOATS", 3 * 6 * 32)  # several chunks, the last one partial
    outs, grads = [], []
    for fused in (True, False):
        cfg, part = _partition(entry, seed=3)
        part.sparse_grads, part.fused_reads = sparse, fused
        x = torch.randn(11, cfg.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
        out, _ = part(x, x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        with torch.no_grad():  # decoding and evaluation read without autograd's Function
            torch.testing.assert_close(part(x, x)[0], out, atol=1e-6, rtol=1e-6)
        grads.append({"x": x.grad, **{n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in part.named_parameters()}})
        if sparse:
            assert all(t.grad.is_sparse for t in part.entry_tables().values())
        if sparse and fused:  # built coalesced: one row per distinct entry read
            assert part.v.grad._nnz() == part.v.grad.coalesce()._nnz()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_read_chunks_fit_a_cpu_cache_and_only_bound_memory_on_an_accelerator():
    import modeling_dpsnr.reads as reads

    n, J, d = 8192, 32, 256  # micro at 32 x 256 tokens: 4 heads x k 8 rows of 256 floats per token
    for device, budget in ((torch.device("cpu"), reads.CHUNK_FLOATS), (torch.device("meta"), reads.ACCELERATOR_CHUNK_FLOATS)):
        chunks = reads._chunks(n, J, d, device)
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a == b_prev for (a, _), (_, b_prev) in zip(chunks[1:], chunks[:-1]))  # contiguous, no gaps
        assert max((b - a) * J * d for a, b in chunks) <= budget
    assert len(reads._chunks(n, J, d, torch.device("cpu"))) >= 64 * len(reads._chunks(n, J, d, torch.device("meta")))


def test_retrieval_gradients_flow_through_the_chosen_sub_keys_only_and_equal_the_dense_ones():
    """Scores of the chosen entries are recomputed from their sub-keys; the gradient must equal the one
    through the full (n, H, n1) score tensors, and be zero on sub-keys no chosen entry uses."""
    torch.manual_seed(0)
    cfg = tiny_config(pool_size=200, pool_partitions={"p": 1.0})
    r = ProductKeyRetriever(cfg, 200)
    torch.nn.init.normal_(r.sub_keys1)
    torch.nn.init.normal_(r.sub_keys2)
    x = torch.randn(7, cfg.hidden_size)
    g = torch.randn(7, r.heads, r.topk)
    out = r(x)
    (out.weights * g).sum().backward()
    got = {n: p.grad.clone() for n, p in r.named_parameters()}
    r.zero_grad()
    # reference: the scores gathered from the full score tensors, gradient through them
    q = r.query_norm(r.query(x).view(7, r.heads, r.key_dim))
    q1, q2 = q.chunk(2, -1)
    s1 = torch.einsum("nhc,hmc->nhm", q1, r.sub_keys1)
    s2 = torch.einsum("nhc,hmc->nhm", q2, r.sub_keys2)
    i1, i2 = out.indices // r.n2, out.indices % r.n2
    (((s1.gather(-1, i1) + s2.gather(-1, i2)).softmax(-1)) * g).sum().backward()
    for n, p in r.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    chosen = torch.zeros(r.heads, r.n1, dtype=torch.bool)
    chosen[torch.arange(r.heads).view(1, -1, 1).expand_as(i1), i1] = True
    assert (got["sub_keys1"][~chosen] == 0).all() and (got["sub_keys1"][chosen].abs().sum(-1) > 0).all()


def test_fused_read_of_half_precision_tables_matches_the_plain_read():
    """Pools stored in fp16 on disk are read by a float32 controller (memory-mapped loading)."""
    outs = []
    for fused in (True, False):
        cfg, part = _partition("neuron", seed=5)
        part.half()
        part.retriever.float()
        part.fused_reads = fused
        x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            outs.append(part(x, x)[0])
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------- one table gradient per forward
def _table_grads(model, ids, **execution):
    model.set_execution(**execution)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("entry, loop_step", [("neuron", "token"), ("neuron", "block"), ("value", "block")])
@pytest.mark.parametrize("sparse", [False, True])
def test_tables_read_at_every_step_get_one_gradient_equal_to_the_per_read_sum(entry, loop_step, sparse):
    """Training forwards sum each table's gradient over all loop steps once (reads.TableGradients); it must
    equal what autograd sums from per-read gradients (the plain, unfused reads), for every parameter, and a
    sparse one must list each read row once, in order (so the optimizer skips its sort)."""
    from dpsnr.training.pool_optim import rows_are_distinct

    model = tiny_model(seed=1, loop_step=loop_step, loop_halting="fixed", pool_partitions={"shared": 1.0}, pool_entry=entry)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    fused = _table_grads(model, ids, pool_sparse_grads=sparse, pool_fused_reads=True)
    if sparse:
        v = model.pool["shared"].v.grad
        assert v.is_sparse and rows_are_distinct(v)
        assert v._nnz() == v.coalesce()._nnz() < v.shape[0]  # only rows read, each once
    plain = _table_grads(model, ids, pool_sparse_grads=sparse, pool_fused_reads=False)
    tables = {f"model.loop.pool.partitions.shared.{t}" for t in model.pool["shared"].table_names}
    assert fused.keys() == plain.keys() and tables <= fused.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_table_gradients_survive_two_forwards_before_one_backward_and_activation_checkpointing():
    """Each forward has its own TableGradients: two losses summed before backward, and a model whose
    controller layers recompute under activation checkpointing, get the gradients of the plain reads."""
    model = tiny_model(seed=3, loop_step="block", loop_halting="fixed", pool_partitions={"shared": 1.0})
    model.train()
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randint(0, model.config.vocab_size, (2, 7), generator=g) for _ in range(2))
    got = {}
    for fused in (True, False):
        model.set_execution(pool_sparse_grads=True, pool_fused_reads=fused)
        model.zero_grad(set_to_none=True)
        (model(a, labels=a).loss + 0.5 * model(b, labels=b).loss).backward()
        got[fused] = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None}
    for name in got[False]:
        torch.testing.assert_close(got[True][name], got[False][name], atol=1e-5, rtol=1e-4, msg=name)
    # transformers ≥ 5.24 renames it activation_checkpointing_*; the floor release has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    model.set_execution(pool_sparse_grads=True, pool_fused_reads=True)
    model.zero_grad(set_to_none=True)
    model(a, labels=a).loss.backward()
    ckpt = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters() if p.grad is not None}
    disable()
    model.zero_grad(set_to_none=True)
    model(a, labels=a).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ckpt[n], p.grad.to_dense() if p.grad.is_sparse else p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_coalesced_flags_distinct_ordered_rows_and_sums_the_others():
    from dpsnr.training.pool_optim import coalesced, rows_are_distinct

    vals = torch.arange(8.0).view(4, 2)
    ordered = torch.sparse_coo_tensor(torch.tensor([[1, 3, 4, 9]]), vals, (10, 2), check_invariants=False)
    assert not ordered.is_coalesced() and rows_are_distinct(ordered)
    out = coalesced(ordered)
    assert out.is_coalesced() and torch.equal(out.to_dense(), ordered.to_dense())
    assert out._values().data_ptr() == vals.data_ptr()  # no copy
    repeated = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3, 9]]), vals, (10, 2), check_invariants=True)
    assert not rows_are_distinct(repeated)
    out = coalesced(repeated)
    assert out.is_coalesced() and out._nnz() == 3 and torch.equal(out.to_dense(), repeated.to_dense())


@pytest.mark.parametrize("m", [64, 128, 256, 320, 1024])
def test_row_topk_equals_torch_topk(m):
    """The two-pass top-k of the sub-key scores returns what `topk` returns: the same sorted values, and
    entries holding them (ties included: repeated scores are common in low precision)."""
    from modeling_dpsnr.retrieval import row_topk

    g = torch.Generator().manual_seed(m)
    scores = torch.randn(300, 3, m, generator=g)
    scores[:5] = scores[:5].round()  # many ties
    for k in (1, 4, 8, 16):
        ref = scores.topk(k, dim=-1)
        values, idx = row_topk(scores, k)
        assert torch.equal(values, ref.values)
        assert torch.equal(scores.gather(-1, idx), values)
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct entries
