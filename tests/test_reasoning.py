"""The reasoning loop: ACT arithmetic as Graves (2016) states it, every halting policy and step kind
eager == static, compute follows halting, the block step is causal and decodes from its cache."""

import math

import pytest
import torch
import torch.utils._python_dispatch
from transformers import DynamicCache

from modeling_dpsnr.reads import PoolRead

from conftest import assert_causal, assert_drivers_agree, greedy_without_cache, tiny_config, tiny_model

POLICIES = ["act", "fixed", "threshold", "exits"]
STEPS = ["token", "block"]

def _act_reference(p_row, eps, max_steps, min_steps=1):
    cum, alpha = 0.0, []
    for s in range(max_steps):
        p = p_row[s] if s + 1 >= min_steps else 0.0
        if cum + p >= 1 - eps or s == max_steps - 1:
            alpha.append(1 - cum)
            return len(alpha), 1 - cum, alpha
        alpha.append(p)
        cum += p


@pytest.mark.parametrize("static", [False, True])
def test_act_arithmetic_on_a_hand_checkable_case(static, monkeypatch):
    probs = torch.tensor([
        [0.2, 0.3, 0.6, 0.9],   # c: .2 .5 1.1 → halts at 3, R = .5
        [0.995, 0.1, 0.1, 0.1],  # halts at 1 (≥ 1-ε), R = 1
        [0.1, 0.1, 0.1, 0.1],   # never reaches 1-ε: capped at 4, R = .7
        [0.5, 0.49, 0.2, 0.2],  # c: .5 .99 → halts at 2 with ε = .01, R = .5
    ])
    model = tiny_model(loop_max_steps=4, loop_halt_epsilon=0.01, pool_query_input="state")
    loop = model.model.loop

    class Step(torch.nn.Module):  # every step adds 1 to the state
        attends, token_norm = False, None

        def forward(self, h, s, rows, token, token_mask, ctx):
            return h + 1.0

    class Halt(torch.nn.Module):  # logit of the scripted p for (token, step), read off the state
        def forward(self, h):
            s = h[:, 1].round().long() - 1  # h_s[1] = s (1-based)
            ids = (h[:, 0] - h[:, 1]).round().long()  # h_s[0] = token id + s
            return torch.logit(probs[ids, s].double()).float().unsqueeze(-1)

    monkeypatch.setattr(loop, "step", Step())
    monkeypatch.setattr(loop.policy, "halt", Halt())
    h0 = torch.zeros(1, 4, loop.config.hidden_size)
    h0[0, :, 0] = torch.arange(4).float()
    out = loop(h0, None, PoolRead(static=static))
    for t in range(4):
        n, r, alpha = _act_reference(probs[t].tolist(), 0.01, 4)
        assert out.steps[0, t] == n
        assert out.ponder_cost[0, t].item() == pytest.approx(n + r)
        expected_h = sum(a * (t + s + 1) for s, a in enumerate(alpha))  # h_s[0] = t + s
        assert out.hidden_states[0, t, 0].item() == pytest.approx(expected_h, abs=1e-5)
        assert out.hidden_states[0, t, 1].item() == pytest.approx(sum(a * (s + 1) for s, a in enumerate(alpha)), abs=1e-5)
        # recorded halting probabilities stop after the halting step
        assert torch.allclose(out.halting_probs[0, t, :n], probs[t, :n])
        assert (out.halting_probs[0, t, n:] == 0).all()


def _varied_halting_model(loop_mode="auto", **overrides):
    """A model whose tokens halt after different numbers of steps, whatever the policy."""
    model = tiny_model(loop_halt_bias_init=0.0, execution={"loop_mode": loop_mode}, **overrides)
    policy = model.model.loop.policy
    with torch.no_grad():
        if hasattr(policy, "halt"):
            torch.nn.init.normal_(policy.halt.weight, std=0.5)  # ACT: tokens halt after 1..4 steps
        if hasattr(policy, "router"):
            torch.nn.init.normal_(policy.router.weight, std=0.5)  # routing: scores spread around τ = 0
        if hasattr(policy, "exit"):
            torch.nn.init.normal_(policy.exit.weight, std=0.5)  # trained exits: CDFs cross q at different steps
    return model


@pytest.mark.parametrize("step_kind", STEPS)
@pytest.mark.parametrize("policy", POLICIES)
def test_eager_and_static_modes_agree_including_gradients(policy, step_kind):
    eager = _varied_halting_model(loop_mode="eager", loop_halting=policy, loop_step=step_kind)
    static = _varied_halting_model(loop_mode="static", loop_halting=policy, loop_step=step_kind)
    static.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    outs = assert_drivers_agree(eager, static, ids, mask)
    steps = outs[0].reasoning_steps
    if policy == "exits":  # training runs every step; at inference tokens stop at different steps
        inference = [m.eval()(ids, attention_mask=mask) for m in (eager, static)]
        assert len(inference[0].reasoning_steps[mask.bool()].unique()) > 1, "test needs tokens that halt at different steps"
        torch.testing.assert_close(inference[0].reasoning_steps, inference[1].reasoning_steps)
        torch.testing.assert_close(inference[0].logits[mask.bool()], inference[1].logits[mask.bool()], atol=1e-5, rtol=1e-4)
    elif policy != "fixed":
        assert len(steps[mask.bool()].unique()) > 1, "test needs tokens that halt at different steps"
    torch.testing.assert_close(outs[0].ponder_loss, outs[1].ponder_loss)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5)
    for (name, be), (_, bs) in zip(eager.named_buffers(), static.named_buffers()):  # routing thresholds, balance
        torch.testing.assert_close(be, bs, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("step_kind", STEPS)
@pytest.mark.parametrize("policy", ["act", "threshold", "exits"])
def test_compute_follows_halting_in_eager_mode(monkeypatch, policy, step_kind):
    model = _varied_halting_model(loop_mode="eager", loop_halting=policy, loop_step=step_kind).eval()
    pool = model.model.loop.pool
    rows_per_step = []
    original = pool.forward

    def counting(partition, query_input, x, **kw):
        rows_per_step.append(query_input.shape[0])
        return original(partition, query_input, x, **kw)

    monkeypatch.setattr(pool, "forward", counting)
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask)
    steps = out.reasoning_steps
    # retrievals per step = tokens still running at that step; padding never runs
    expected = [int((steps >= s + 1).sum()) for s in range(model.config.loop_max_steps)]
    expected = [e for e in expected if e > 0]
    assert rows_per_step == expected
    assert sum(rows_per_step) == int(steps.sum())
    assert (steps[1, :3] == 0).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_step_counts_respect_min_and_max(policy):
    model = _varied_halting_model(loop_min_steps=3, loop_halting=policy).eval()
    out = model(torch.randint(0, 97, (2, 9)))
    assert (out.reasoning_steps >= 3).all() and (out.reasoning_steps <= 4).all()
    if policy == "act":
        assert (out.halting_probs[..., :2] == 0).all()


def test_untrained_model_runs_most_steps_and_trains_every_partition():
    model = tiny_model().train()  # default halting bias: σ(-2.2) ≈ 0.1
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, labels=ids)
    assert out.reasoning_steps.float().mean() >= model.config.loop_max_steps - 0.5
    out.loss.backward()
    loop = model.model.loop
    for name, part in loop.pool.partitions.items():
        for tname, table in part.entry_tables().items():
            assert table.grad is not None and table.grad.abs().sum() > 0, f"{name}.{tname}"
        r = part.retriever
        for p in (r.query.weight, r.sub_keys1, r.sub_keys2):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert loop.policy.halt.weight.grad.abs().sum() > 0 and loop.policy.halt.bias.grad.abs().sum() > 0
    assert loop.step.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["fixed", "none"])  # "none": the name configs saved before the registry carry
def test_fixed_steps_run_every_step_and_add_no_ponder_term(name):
    model = tiny_model(loop_halting=name)
    assert model.config.loop_halting == "fixed"
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    assert (out.reasoning_steps == model.config.loop_max_steps).all()
    torch.testing.assert_close(out.loss, out.lm_loss)


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that read a tensor's value on the host (a sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("step_kind", STEPS)
def test_a_fixed_depth_loop_reads_nothing_on_the_host_and_agrees_with_the_static_driver(step_kind):
    eager = tiny_model(loop_halting="fixed", loop_step=step_kind, execution={"loop_mode": "eager"})
    static = tiny_model(loop_halting="fixed", loop_step=step_kind, execution={"loop_mode": "static"})
    static.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    out = eager.model.embed_tokens(ids)
    with _HostSyncs() as syncs:  # the loop alone: every running token halts at the last step, known up front
        eager.model.loop(out, None, token_embeddings=out, position_embeddings=eager.model.rotary_emb(out, torch.arange(9)[None]))
    assert syncs.count == 0
    adaptive = tiny_model(loop_halting="act", loop_step=step_kind, execution={"loop_mode": "eager"})
    with _HostSyncs() as syncs:  # the probe can fail: a policy that may halt early asks at every step
        adaptive.model.loop(out, None, token_embeddings=out, position_embeddings=adaptive.model.rotary_emb(out, torch.arange(9)[None]))
    assert syncs.count >= 1
    assert_drivers_agree(eager, static, ids, torch.ones_like(ids))  # no padding: the loop's shortcut


@pytest.mark.parametrize("loop_mode", ["eager", "static"])
def test_block_step_normalises_each_state_once_while_nobody_halts(loop_mode):
    # Keys and queries of a step come from the same normalised state: one attn_norm per step when the rows
    # whose keys need refreshing are the rows the step runs; padding (eager) makes them differ at step 0.
    model = tiny_model(loop_halting="fixed", loop_step="block", execution={"loop_mode": loop_mode}).eval()
    calls = []
    model.model.loop.step.attn_norm.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    ids = torch.randint(0, 97, (2, 7))
    model(ids)
    assert len(calls) == model.config.loop_max_steps
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    calls.clear()
    model(ids, attention_mask=mask)
    extra = 1 if loop_mode == "eager" else 0  # eager: the padded rows' keys at step 0 are normalised apart
    assert len(calls) == model.config.loop_max_steps + extra


def test_loss_is_lm_plus_weighted_ponder():
    model = tiny_model(loop_ponder_weight=0.5)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.ponder_loss)
    # the ponder term is differentiable (through the remainder R) and reaches the halting head
    model.zero_grad()
    out.ponder_loss.backward()
    assert model.model.loop.policy.halt.bias.grad.abs() > 0


@pytest.mark.parametrize("policy", ["act", "exits"])  # ACT's ponder cost; the exits' expected loss and entropy
def test_ponder_and_lm_loss_scale_together_under_gradient_accumulation(policy):
    model = _varied_halting_model(loop_halting=policy).train()
    ids = torch.randint(0, 97, (4, 10))
    labels = ids.clone()
    labels[1, 5:] = -100
    full = model(ids, labels=labels)
    # two micro-batches normalised by the items of the whole accumulated batch
    n_items = int((labels[:, 1:] != -100).sum())
    parts = [model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=torch.tensor(n_items)) for i in (0, 2)]
    torch.testing.assert_close(parts[0].lm_loss + parts[1].lm_loss, full.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0].ponder_loss + parts[1].ponder_loss, full.ponder_loss, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- trained exits
def _exits_model(bias=None, **overrides):
    """Trained exits with a zero exit head: λ_s = σ(bias_s) for every token (default: the init's uniform p)."""
    model = tiny_model(loop_halting="exits", **overrides)
    head = model.model.loop.policy.exit
    with torch.no_grad():
        head.weight.zero_()
        if bias is not None:
            head.bias.copy_(torch.tensor(bias))
    return model


def test_exits_start_uniform_and_their_loss_is_the_expected_loss_minus_the_entropy_bonus():
    model = _exits_model(loop_ponder_weight=0.1).train()
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    S = model.config.loop_max_steps
    # every token runs every step in training, and its exit distribution starts uniform
    assert (out.reasoning_steps == S).all()
    torch.testing.assert_close(out.halting_probs, torch.full_like(out.halting_probs, 1.0 / S))
    torch.testing.assert_close(out.ponder_loss, torch.tensor(-math.log(S)))  # −H(uniform)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.ponder_loss)
    # the exits' losses: mass on the last exit gives a fixed loop's loss (transformers' loss function)
    last = _exits_model(bias=[-30.0] * (S - 1)).train()
    fixed = tiny_model(loop_halting="fixed").train()
    fixed.load_state_dict(last.state_dict(), strict=False)
    torch.testing.assert_close(last(ids, labels=ids).lm_loss, fixed(ids, labels=ids).lm_loss, atol=1e-5, rtol=1e-5)
    # the exit head learns from the loss: earlier exits are worse, so mass moves to later ones
    out.loss.backward()
    head = model.model.loop.policy.exit
    assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("threshold, steps", [(0.2, 1), (0.6, 3), (0.9, 4)])
def test_exits_stop_where_the_exit_cdf_reaches_the_threshold_at_inference(threshold, steps):
    # uniform p over 4 steps: CDF .25 .5 .75 1
    model = _exits_model(loop_exit_threshold=threshold).eval()
    out = model(torch.randint(0, 97, (2, 9)))
    assert (out.reasoning_steps == steps).all()
    torch.testing.assert_close(out.halting_probs[..., :steps], torch.full_like(out.halting_probs[..., :steps], 0.25))
    assert (out.halting_probs[..., steps:] == 0).all()


# ---------------------------------------------------------------------------- threshold routing
def test_threshold_routing_reaches_its_capacity_and_its_router_learns_from_the_loss():
    model = tiny_model(loop_halting="threshold", loop_capacity=[1.0, 0.6, 0.5, 0.4], loop_threshold_momentum=1.0).train()
    ids = torch.randint(0, 97, (4, 16))
    out = model(ids, labels=ids)
    # τ_s is the batch quantile (momentum 1): the shares reaching each step are the capacities
    reached = [(out.reasoning_steps >= s + 1).float().mean().item() for s in range(4)]
    assert reached == pytest.approx([1.0, 0.6, 0.5, 0.4], abs=0.04)
    out.loss.backward()
    router = model.model.loop.policy.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # the router only scales the gradient: in the forward each step's update is unchanged
    fixed = tiny_model(loop_halting="fixed").eval()
    fixed.load_state_dict(model.state_dict(), strict=False)
    model.eval()
    a, b = model(ids[:1, :6]), fixed(ids[:1, :6])
    if (a.reasoning_steps == 4).all():
        torch.testing.assert_close(a.logits, b.logits)


def test_threshold_routing_is_causal_at_inference():
    model = _varied_halting_model(loop_halting="threshold").eval()
    ids = torch.randint(0, 97, (2, 12))
    base = model(ids)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    out = model(changed)
    torch.testing.assert_close(out.logits[:, :7], base.logits[:, :7])
    assert torch.equal(out.reasoning_steps[:, :7], base.reasoning_steps[:, :7])


# ---------------------------------------------------------------------------- block step
@pytest.mark.parametrize("policy", POLICIES)
def test_block_step_is_causal(policy):
    model = _varied_halting_model(loop_step="block", loop_halting=policy).eval()
    assert_causal(model, torch.randint(0, 97, (2, 12)), (0, 6, 11), 97)


def test_block_step_attends_to_the_sequence_at_each_depth():
    """With no prelude blocks the loop starts from the embeddings: a token step's output at t
    depends on token t alone, a block step's also on the tokens before it."""
    def loop_output(model, ids):
        seen = {}
        hook = model.model.loop.register_forward_hook(lambda m, a, o: seen.update(h=o.hidden_states))
        model(ids)
        hook.remove()
        return seen["h"][0, 5]

    ids = torch.randint(0, 97, (1, 8))
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 97
    for kind, mixes in (("block", True), ("token", False)):
        model = tiny_model(loop_step=kind, num_prelude_layers=0, loop_halting="fixed").eval()
        assert torch.allclose(loop_output(model, ids), loop_output(model, changed)) != mixes, kind


@pytest.mark.parametrize("loop_mode", ["eager", "static"])
@pytest.mark.parametrize("policy", ["act", "threshold", "exits"])
def test_block_step_cached_decoding_equals_uncached_with_tokens_halting_at_different_depths(policy, loop_mode):
    model = _varied_halting_model(loop_mode=loop_mode, loop_step="block", loop_halting=policy).eval()
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids, use_cache=False)
    assert len(full.reasoning_steps.unique()) > 1, "test needs tokens that halt at different depths"
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :5], cache=cache, use_cache=True)
    logits, steps = [out.logits], [out.reasoning_steps]
    for t in range(5, 11):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        steps.append(out.reasoning_steps)
    assert torch.equal(torch.cat(steps, 1), full.reasoning_steps)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=1e-4)
    # one cache layer per controller block and per reasoning step
    assert len(cache.layers) == model.config.num_hidden_layers + model.config.loop_max_steps


def test_block_step_greedy_generate_equals_manual_argmax():
    model = _varied_halting_model(loop_step="block", loop_halting="act").eval()
    ids = torch.randint(0, 97, (2, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, ids, 6))


# ---------------------------------------------------------------------------- cost model
def test_cost_model_grows_with_steps_only_through_the_loop_and_counts_a_dense_block_like_llama():
    from modeling_dpsnr.cost import block_macs, forward_macs

    model = tiny_model(loop_step="block")
    c = model.config
    one, four = forward_macs(c, steps=1, context=10), forward_macs(c, steps=4, context=10)
    assert one["controller"] == four["controller"] and one["lm_head"] == four["lm_head"]
    torch.testing.assert_close(torch.tensor(four["loop"] - one["loop"]), torch.tensor(3 * one["loop"]), rtol=0.05, atol=0)
    # a controller block: 4 d² attention projections (d = H·hd here, GQA halves k and v) + QKᵀ·V + 3·d·I
    d, hd, i = c.hidden_size, c.attention_head_dim, c.intermediate_size
    assert block_macs(d, 4, 2, hd, i, 10) == d * d * 2 + d * 2 * hd * 2 + 2 * 4 * hd * 10 + 3 * d * i
    assert model.estimate_flops(steps=2, context=10, training=True) == 3 * 2 * forward_macs(c, 2, 10)["total"]
    assert model.estimate_pool_bytes(steps=2) == 2 * model.estimate_pool_bytes(steps=1)


# ---------------------------------------------------------------------------- capacity-bounded static driver
@pytest.mark.parametrize("step_kind", STEPS)
def test_capacity_bounded_static_driver_equals_eager_when_the_bound_covers_the_routing(step_kind, monkeypatch):
    eager = _varied_halting_model(loop_mode="eager", loop_halting="threshold", loop_step=step_kind)
    static = _varied_halting_model(loop_mode="static", loop_halting="threshold", loop_step=step_kind)
    static.set_execution(loop_static_capacity=2.0)
    static.load_state_dict(eager.state_dict())
    rows_read = []
    original = static.model.loop.pool.forward
    monkeypatch.setattr(static.model.loop.pool, "forward", lambda p, q, x, **kw: rows_read.append(q.shape[0]) or original(p, q, x, **kw))
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for mode in ("train", "eval"):
        rows_read.clear()
        outs = [m.train(mode == "train")(ids, attention_mask=mask, labels=ids) for m in (eager, static)]
        keep = mask.bool()
        assert torch.equal(outs[0].reasoning_steps, outs[1].reasoning_steps)
        torch.testing.assert_close(outs[0].logits[keep], outs[1].logits[keep], atol=1e-5, rtol=1e-4)
        n = ids.numel()
        cap = static.config.loop_capacity
        assert rows_read == [min(n, math.ceil(2.0 * c * n)) for c in cap]  # fixed sizes, below n after step 1
        assert rows_read[-1] < n


def test_capacity_bounded_static_driver_halts_the_overflow_and_stays_within_its_bound():
    model = _varied_halting_model(loop_mode="static", loop_halting="threshold", loop_capacity=[1.0, 0.5, 0.25, 0.25]).eval()
    with torch.no_grad():
        model.model.loop.policy.thresholds.fill_(-100.0)  # every token wants every step
    model.set_execution(loop_static_capacity=1.0)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids)
    reached = [(out.reasoning_steps >= s + 1).sum().item() for s in range(4)]
    assert reached == [16, 8, 4, 4]
    assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="loop_static_capacity"):
        model.set_execution(loop_static_capacity=0.5)


def test_exit_gate_loss_pushes_exits_to_where_the_next_step_stops_helping():
    from modeling_dpsnr.halting import TrainedExits

    def grad_of_lambdas(ce, lam0=(0.25, 1 / 3, 0.5), min_steps=1):
        lam = torch.tensor(lam0, requires_grad=True)
        survive = torch.cat([torch.ones(1), torch.cumprod(1 - lam, 0)])  # (4,)
        probs = survive * torch.cat([lam, torch.ones(1)])
        TrainedExits.gate_loss(probs, torch.tensor(ce), min_steps).backward()
        return lam.grad

    # every next step lowers the loss a lot: exit less (∂loss/∂λ > 0); none does: exit more
    assert (grad_of_lambdas([4.0, 3.0, 2.0, 1.0]) > 0).all()
    assert (grad_of_lambdas([2.0, 2.0, 2.0, 2.0]) < 0).all()
    # the second step helps, later ones do not: continue after step 1, stop after 2 and 3
    g = grad_of_lambdas([3.0, 2.0, 2.0, 2.0])
    assert g[0] > 0 and g[1] < 0 and g[2] < 0
    # decisions no token reaches (an exit after step 1 for sure) and forced ones carry no weight
    assert grad_of_lambdas([4.0, 3.0, 2.0, 1.0], lam0=(1 - 1e-7, 0.5, 0.5))[1:].abs().max() < 1e-4
    assert grad_of_lambdas([4.0, 3.0, 2.0, 1.0], min_steps=3)[:2].abs().max() < 1e-6


def test_cost_model_charges_trained_exits_for_every_step_and_every_exit_in_training():
    from modeling_dpsnr.cost import block_macs, flops_per_token

    exits, fixed = tiny_config(loop_halting="exits"), tiny_config(loop_halting="fixed")
    c = exits
    coda = (c.num_hidden_layers - c.num_prelude_layers) * block_macs(
        c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attention_head_dim, c.intermediate_size, 10)
    extra = 6 * (c.loop_max_steps - 1) * (coda + c.hidden_size * c.vocab_size)
    for steps in (1.5, 4):  # training runs every step whatever the mean at inference
        assert flops_per_token(exits, steps, 10, training=True) == pytest.approx(flops_per_token(fixed, 4, 10, training=True) + extra)
    assert flops_per_token(exits, 2, 10) == pytest.approx(flops_per_token(fixed, 2, 10))  # inference: the steps run
    # a sample of m earlier exits per forward pays for m codas and heads
    one = extra / (c.loop_max_steps - 1)
    assert flops_per_token(exits, 4, 10, training=True, exit_samples=1) == pytest.approx(
        flops_per_token(fixed, 4, 10, training=True) + one)
    model = tiny_model(loop_halting="exits")
    model.set_execution(exit_samples=2)
    assert model.estimate_flops(4, 10, training=True) == pytest.approx(flops_per_token(fixed, 4, 10, training=True) + 2 * one)


def test_sampled_exits_estimate_the_expected_loss_without_bias(monkeypatch):
    from modeling_dpsnr.modeling_dpsnr import DPSNRModel

    # distinct exit probabilities, so a wrong weight or a wrong exit shows in the loss
    model = _exits_model(bias=[-1.0, 0.3, 0.8], loop_ponder_weight=0.1, pool_query_norm="rms").train()
    ids = torch.randint(0, 97, (2, 10))
    S = model.config.loop_max_steps
    full = model(ids, labels=ids)
    model.set_execution(exit_samples=1)
    drawn = []
    for s in range(S - 1):  # each earlier exit drawn in turn
        monkeypatch.setattr(DPSNRModel, "_earlier_exits_to_train", lambda self, earlier, s=s: {s})
        out = model(ids, labels=ids)
        torch.testing.assert_close(out.ponder_loss, full.ponder_loss)  # the entropy needs only p
        drawn.append(out.lm_loss)
    # lm_loss is an unbiased estimate: its mean over the (uniform) draws is the loss over every exit
    torch.testing.assert_close(torch.stack(drawn).mean(), full.lm_loss, atol=1e-5, rtol=1e-5)
    assert max(abs(float(d.detach() - full.lm_loss.detach())) for d in drawn) > 0  # and the draws differ
    # an exit that was not drawn costs the last exit's loss, not nothing: with all mass on exit 1 and
    # exit 2 drawn, the estimate is the last exit's loss (a plain importance weight would give ~0, and
    # the exit head would learn to hide its mass where the forward did not look)
    first = _exits_model(bias=[30.0, 0.0, 0.0], pool_query_norm="rms").train()
    first.load_state_dict(model.state_dict(), strict=False)
    first.set_execution(exit_samples=1)
    with torch.no_grad():
        first.model.loop.policy.exit.bias.copy_(torch.tensor([30.0, 0.0, 0.0]))
    monkeypatch.setattr(DPSNRModel, "_earlier_exits_to_train", lambda self, earlier: {1})
    every = _exits_model(bias=[-30.0] * (S - 1), pool_query_norm="rms").train()  # all mass on the last exit
    every.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        every.model.loop.policy.exit.bias.fill_(-30.0)
    torch.testing.assert_close(first(ids, labels=ids).lm_loss, every(ids, labels=ids).lm_loss, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    # the model draws m of the S − 1 earlier exits, and only those reach the coda
    model.set_execution(exit_samples=2)
    out = model.model(ids)
    computed = [h is not None for h in out.exit_hidden_states]
    assert len(computed) == S and computed[-1] and sum(computed) == 3
    model.set_execution(exit_samples=S)  # more than there are: every exit, the full loss
    torch.testing.assert_close(model(ids, labels=ids).lm_loss, full.lm_loss)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="exit_samples"):
            model.set_execution(exit_samples=bad)


def test_the_gate_objective_uses_every_exit_whatever_exit_samples_says():
    model = _exits_model(bias=[-1.0, 0.3, 0.8], pool_query_norm="rms").train()
    ids = torch.randint(0, 97, (2, 10))
    model.set_execution(exit_objective="gate")
    full = model(ids, labels=ids).loss
    model.set_execution(exit_samples=1)
    torch.testing.assert_close(model(ids, labels=ids).loss, full)
