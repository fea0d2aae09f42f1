"""The ACT loop: arithmetic as Graves (2016) states it, eager == static, compute follows halting."""

import pytest
import torch

from conftest import tiny_config, tiny_model




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

    def step(h, s, static, token_mask=None, token=None):
        # identify tokens by their state's first coordinate (h0 = token id, +1 per step)
        ids = (h[:, 0] - s).round().long()
        return h + 1.0, probs[ids, s]

    monkeypatch.setattr(loop, "step", step)
    h0 = torch.zeros(1, 4, loop.config.hidden_size)
    h0[0, :, 0] = torch.arange(4).float()
    out = loop(h0, None, static=static)
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
    model = tiny_model(loop_halt_bias_init=0.0, execution={"loop_mode": loop_mode}, **overrides)
    torch.nn.init.normal_(model.model.loop.halt.weight, std=0.5)  # tokens halt after 1..4 steps
    return model


def test_eager_and_static_modes_agree_including_gradients():
    eager = _varied_halting_model(loop_mode="eager")
    static = _varied_halting_model(loop_mode="static")
    static.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    outs = [m(ids, attention_mask=mask, labels=ids) for m in (eager, static)]
    steps = outs[0].reasoning_steps
    assert len(steps[mask.bool()].unique()) > 1, "test needs tokens that halt at different steps"
    for key in ("reasoning_steps", "halting_probs", "active_params"):
        torch.testing.assert_close(outs[0][key], outs[1][key])
    keep = mask.bool()
    torch.testing.assert_close(outs[0].logits[keep], outs[1].logits[keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0].ponder_loss, outs[1].ponder_loss)
    for o in outs:
        o.loss.backward()
    for (name, pe), (_, ps) in zip(eager.named_parameters(), static.named_parameters()):
        # a partition no running token reached has no gradient in eager mode, zeros in static
        ge = pe.grad if pe.grad is not None else torch.zeros_like(pe)
        gs = ps.grad if ps.grad is not None else torch.zeros_like(ps)
        torch.testing.assert_close(ge, gs, atol=1e-5, rtol=1e-4, msg=name)


def test_compute_follows_halting_in_eager_mode(monkeypatch):
    model = _varied_halting_model(loop_mode="eager").eval()
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


def test_min_steps_floor():
    model = _varied_halting_model(loop_min_steps=3)
    out = model(torch.randint(0, 97, (2, 9)))
    assert (out.reasoning_steps >= 3).all()
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
    assert loop.halt.weight.grad.abs().sum() > 0 and loop.halt.bias.grad.abs().sum() > 0
    assert loop.gate.weight.grad.abs().sum() > 0


def test_without_act_every_token_runs_all_steps_and_no_ponder_term():
    model = tiny_model(loop_halting="none")
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    assert (out.reasoning_steps == model.config.loop_max_steps).all()
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_loss_is_lm_plus_weighted_ponder():
    model = tiny_model(loop_ponder_weight=0.5)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.ponder_loss)
    # the ponder term is differentiable (through the remainder R) and reaches the halting head
    model.zero_grad()
    out.ponder_loss.backward()
    assert model.model.loop.halt.bias.grad.abs() > 0


def test_ponder_and_lm_loss_scale_together_under_gradient_accumulation():
    model = _varied_halting_model()
    ids = torch.randint(0, 97, (4, 10))
    labels = ids.clone()
    labels[1, 5:] = -100
    full = model(ids, labels=labels)
    # two micro-batches normalised by the items of the whole accumulated batch
    n_items = int((labels[:, 1:] != -100).sum())
    parts = [model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=torch.tensor(n_items)) for i in (0, 2)]
    torch.testing.assert_close(parts[0].lm_loss + parts[1].lm_loss, full.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0].ponder_loss + parts[1].ponder_loss, full.ponder_loss, atol=1e-5, rtol=1e-5)
