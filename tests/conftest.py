"""Shared fixtures: tiny configurations that build and run in milliseconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_prelude_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pool_size=300, pool_heads=2, pool_topk=3, pool_key_dim=16, loop_max_steps=4,
)


def tiny_config(**overrides) -> DPSNRConfig:
    kwargs = dict(TINY)
    kwargs.update(overrides)
    return DPSNRConfig(**kwargs)


def tiny_model(seed: int = 0, execution: dict | None = None, **overrides) -> DPSNRForCausalLM:
    """A tiny model; `execution` goes to `model.set_execution` (how it runs, not what it is)."""
    torch.manual_seed(seed)
    model = DPSNRForCausalLM(tiny_config(**overrides))
    if execution:
        model.set_execution(**execution)
    return model


# ---------------------------------------------------------------------------- checks several test files make
def assert_causal(model, ids: torch.Tensor, positions, vocab_size: int) -> None:
    """Changing token t leaves every logit (and reasoning step count) before t unchanged, and changes some
    at or after t (DESIGN.md §8.2: no future token may leak into earlier positions)."""
    base = model(ids)
    for t in positions:
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % vocab_size
        out = model(changed)
        torch.testing.assert_close(out.logits[:, :t], base.logits[:, :t])
        if getattr(base, "reasoning_steps", None) is not None:
            assert torch.equal(out.reasoning_steps[:, :t], base.reasoning_steps[:, :t])
        assert not torch.allclose(out.logits[:, t:], base.logits[:, t:])


def greedy_without_cache(model, ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None = None):
    """Greedy continuation by full forwards without a KV cache: what cached `generate` must equal."""
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
    return ids


def assert_drivers_agree(eager, static, ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Two copies of a model, one per loop driver, trained on one batch: the per-token statistics, the
    logits of real tokens and every gradient agree. A parameter no running token reached has no gradient
    in eager mode and zeros in static mode. Returns both outputs (after backward)."""
    outs = [m.train()(ids, attention_mask=mask, labels=ids) for m in (eager, static)]
    for key in ("reasoning_steps", "halting_probs", "active_params"):
        torch.testing.assert_close(outs[0][key], outs[1][key])
    keep = mask.bool()
    torch.testing.assert_close(outs[0].logits[keep], outs[1].logits[keep], atol=1e-5, rtol=1e-4)
    for o in outs:
        o.loss.backward()
    for (name, pe), (_, ps) in zip(eager.named_parameters(), static.named_parameters()):
        ge = pe.grad if pe.grad is not None else torch.zeros_like(pe)
        gs = ps.grad if ps.grad is not None else torch.zeros_like(ps)
        torch.testing.assert_close(ge, gs, atol=1e-5, rtol=1e-4, msg=name)
    return outs


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model().eval()
