"""DPSNRForCausalLM as transformers users rely on it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from modeling_dpsnr import DPSNRForCausalLM

from conftest import assert_causal, tiny_model

V = 97


def test_changing_token_t_leaves_earlier_logits_unchanged():
    assert_causal(tiny_model().eval(), torch.randint(0, V, (2, 12)), (0, 5, 11), V)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(attn):
    model = tiny_model(loop_halt_bias_init=0.0).eval()
    model.config._attn_implementation = attn
    ids = torch.randint(0, V, (2, 10))
    full = model(ids, use_cache=False)
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :6], past_key_values=cache, use_cache=True)
    logits, steps = [out.logits], [out.reasoning_steps]
    for t in range(6, 10):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
        steps.append(out.reasoning_steps)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat(steps, 1), full.reasoning_steps)


def test_sdpa_and_eager_attention_agree():
    model = tiny_model().eval()
    ids = torch.randint(0, V, (2, 9))
    model.config._attn_implementation = "eager"
    a = model(ids).logits
    model.config._attn_implementation = "sdpa"
    b = model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_left_padding_matches_unpadded_sequences():
    model = tiny_model(loop_halt_bias_init=0.0).eval()
    a = torch.randint(0, V, (1, 7))
    b = torch.randint(0, V, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model(batch, attention_mask=mask)
    torch.testing.assert_close(out.logits[0], model(a).logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, 3:], model(b).logits[0], atol=1e-5, rtol=1e-4)
    assert (out.reasoning_steps[1, :3] == 0).all()  # padding never enters the loop


def test_save_load_round_trip_keeps_every_tensor(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # make loaded values distinguishable from any initialisation
        model.model.loop.policy.halt.bias.fill_(1.234)
        model.pool["knowledge"].v[0].fill_(7.0)
        model.pool["grammar"].retriever.sub_keys1.mul_(3.0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, DPSNRForCausalLM)
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys()
    for k in sd:
        assert torch.equal(sd[k], ld[k]), k
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, V, (1, 6))
    torch.testing.assert_close(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, V, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = tiny_model().train()
        if ckpt:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[1, 2, V + 5]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, V, (1, 65)))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.randint(0, V, (1, 5)), labels=torch.randint(0, V, (1, 4)))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, V, (1, 5)), attention_mask=torch.ones(1, 3))


def test_outputs_carry_reasoning_statistics():
    model = tiny_model().eval()
    out = model(torch.randint(0, V, (2, 5)), output_hidden_states=True, output_attentions=True)
    cfg = model.config
    assert out.reasoning_steps.shape == (2, 5) and out.reasoning_steps.dtype == torch.long
    assert out.halting_probs.shape == (2, 5, cfg.loop_max_steps)
    per_step = cfg.pool_heads * cfg.pool_topk * cfg.pool_entry_params
    expected = model.model.active_params_base() + out.reasoning_steps * per_step
    assert torch.equal(out.active_params, expected)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    model.config._attn_implementation = "eager"
    out = model(torch.randint(0, V, (2, 5)), output_attentions=True)
    assert len(out.attentions) == cfg.num_hidden_layers
    as_tuple = model(torch.randint(0, V, (1, 3)), return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 3, cfg.vocab_size)  # logits first without labels


# ---------------------------------------------------------------------------- generate
def test_greedy_generate_equals_manual_argmax_without_cache():
    model = tiny_model(loop_halt_bias_init=0.0).eval()
    ids = torch.randint(0, V, (2, 5))
    out, stats = model.generate(ids, max_new_tokens=6, do_sample=False, return_reasoning_stats=True)
    manual = ids
    manual_steps = []
    for _ in range(6):
        o = model(manual, use_cache=False)
        manual_steps.append(o.reasoning_steps[:, -1])
        manual = torch.cat([manual, o.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, manual)
    assert torch.equal(stats["steps"], torch.stack(manual_steps, 1))
    cfg = model.config
    assert torch.equal(stats["rows_read"], stats["steps"] * cfg.pool_heads * cfg.pool_topk)
    assert stats["avg_loops"] == pytest.approx(stats["steps"].float().mean().item())
    assert stats["prompt_steps"].shape == (2, 5)


def test_generate_dict_output_sampling_and_beam_search():
    model = tiny_model().eval()
    ids = torch.randint(0, V, (2, 4))
    plain = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 7)
    d = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(d.sequences, plain)
    assert d.reasoning_stats["steps"].shape == (2, 3) and len(d.scores) == 3
    torch.manual_seed(0)
    s1 = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(0)
    s2 = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    assert torch.equal(s1, s2)
    beams, stats = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, return_reasoning_stats=True)
    assert beams.shape == (2, 8)
    assert stats["steps"].shape[0] == 2 * 3  # one row per beam slot


def test_text_generation_pipeline(tmp_path):
    from transformers import pipeline, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(V - 1)}
    vocab["[UNK]"] = V - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w0", pad_token="w0")
    model = tiny_model().eval()
    gen = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = gen("w1 w2 w3", max_new_tokens=4, do_sample=False, return_full_text=False)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    direct = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"] == tokenizer.decode(direct[0, 3:])


def test_remote_code_loads_in_a_process_where_the_package_is_not_importable(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_dpsnr.DPSNRForCausalLM"
    for f in ("configuration_dpsnr.py", "modeling_dpsnr.py", "pool.py", "reasoning.py", "presets.py"):
        assert (tmp_path / f).exists(), f
    ids = torch.randint(0, V, (1, 5))
    expected = model(ids).logits
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["modeling_dpsnr"] = None  # the installed package must not be used
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        ids = torch.tensor({ids.tolist()})
        out, stats = m.generate(ids, max_new_tokens=2, do_sample=False, return_reasoning_stats=True)
        print(repr(m(ids).logits.tolist()))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.tensor(eval(res.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------- transformers releases
def test_the_cache_keyword_of_every_5x_release_is_accepted_and_returned():
    """5.24 renamed `past_key_values` to `cache`; a forward that ignored either name would decode
    without its cache. Both keywords give the same logits and hand the same cache back."""
    from modeling_dpsnr.cache import CACHE_NAME, output_cache

    model = tiny_model().eval()
    ids = torch.randint(0, V, (2, 7))
    prefix = model(ids[:, :5], use_cache=True)
    cache = output_cache(prefix)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
    assert getattr(prefix, CACHE_NAME) is cache
    full = model(ids, use_cache=False).logits[:, 5:]
    for name in ("cache", "past_key_values"):
        c = DynamicCache(config=model.config)
        model(ids[:, :5], use_cache=True, **{name: c})
        out = model(ids[:, 5:], use_cache=True, **{name: c})
        assert output_cache(out) is c and c.get_seq_length() == 7, name
        torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_generate_decodes_one_token_per_forward_from_its_cache():
    model = tiny_model(loop_halt_bias_init=0.0).eval()
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        model.generate(torch.randint(0, V, (1, 6)), max_new_tokens=4, do_sample=False)
    finally:
        hook.remove()
    assert lengths == [6, 1, 1, 1]


# ---------------------------------------------------------------------------- conventions of transformers models
def test_base_model_honours_return_dict_false():
    model = tiny_model().eval()
    ids = torch.randint(0, V, (1, 4))
    out = model.model(ids, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], model.model(ids).last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model.model(ids), tuple) and isinstance(model(ids), tuple)


def test_positions_not_row_length_are_validated_packed_rows_run():
    """Three sequences packed in one row of 90 tokens, each with positions from 0: longer than
    max_position_embeddings (64) as a row, but every position is inside the trained context."""
    model = tiny_model().eval()
    lengths = (40, 30, 20)
    seqs = [torch.randint(0, V, (1, n)) for n in lengths]
    packed = torch.cat(seqs, 1)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    out = model(packed, position_ids=positions).logits
    torch.testing.assert_close(out[:, :40], model(seqs[0]).logits)  # the first sequence sees nothing else
    with pytest.raises(ValueError, match="position_ids reach 89"):
        model(packed)  # positions 0..89 by default: beyond the default RoPE's context


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_scaled_rope_builds_with_default_head_dim_and_extends_the_context(rope_type):
    model = tiny_model(max_position_embeddings=32, rope_parameters={"rope_type": rope_type, "factor": 2.0}).eval()
    assert model.config.head_dim == model.config.hidden_size // model.config.num_attention_heads
    ids = torch.randint(0, V, (1, 50))
    logits = model(ids).logits  # beyond the 32 trained positions: allowed with scaled RoPE
    assert torch.isfinite(logits).all()


def test_dynamic_rope_recomputes_its_frequencies_beyond_the_trained_context():
    model = tiny_model(max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0}).eval()
    rope = model.model.rotary_emb
    short = rope.inv_freq.clone()
    model(torch.randint(0, V, (1, 20)))
    torch.testing.assert_close(rope.inv_freq, short)  # inside the context: the default frequencies
    model(torch.randint(0, V, (1, 60)))
    assert not torch.allclose(rope.inv_freq, short)  # NTK-scaled for 60 positions
