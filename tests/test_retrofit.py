"""Retrofitting a DPSN-R memory into a pretrained Llama (retrofit.py): the logits are exactly the
pretrained ones until the memory trains, only the memory trains, the folder loads with remote code
where the package is not installed, and cached decoding equals uncached."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modeling_dpsnr import DPSNRRetrofitConfig, DPSNRRetrofitForCausalLM, add_memory

from conftest import greedy_without_cache

V = 97
POOL = dict(pool_size=300, pool_heads=2, pool_topk=3, pool_key_dim=16, ngram_heads=2)


def _llama(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def _trained(model):
    """As if the memory had trained: an open gate and pool rows that matter."""
    with torch.no_grad():
        model.memory.gate.normal_()
        for t in model.pool.entry_parameters():
            t.normal_(std=0.5)
    return model


@pytest.mark.parametrize("memory,loop", [("hashed", False), ("product_key", False), ("both", False), ("both", True)])
def test_logits_are_exactly_the_pretrained_ones_until_the_memory_trains(memory, loop):
    base = _llama()
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = base(ids, attention_mask=mask).logits
    model = add_memory(base, after_layer=1, memory=memory, loop=loop, **POOL).eval()
    assert model.language_model is base
    assert torch.equal(model(ids, attention_mask=mask).logits, expected)
    assert (model(ids).reasoning_steps >= 1).all()
    _trained(model)
    assert not torch.allclose(model(ids, attention_mask=mask).logits, expected)  # the memory is really read


def test_only_the_memory_trains_and_its_gradients_reach_the_pool():
    base = _llama()
    model = add_memory(base, after_layer=0, memory="both", **POOL).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.memory.named_parameters(prefix="memory")}
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    opt = torch.optim.AdamW(model.memory_parameters(), lr=1e-2)
    ids = torch.randint(0, V, (2, 8))
    for _ in range(2):  # step 1 opens the gate, step 2 trains through it
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert model.memory.gate.abs().sum() > 0
    assert model.pool["ngram"].v.grad.abs().sum() > 0 and model.pool["knowledge"].u.grad.abs().sum() > 0
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    # sparse pool gradients, as DPSN-R's trainer uses them
    model.set_execution(pool_sparse_grads=True)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert model.pool["ngram"].v.grad.is_sparse and model.pool["knowledge"].v.grad.is_sparse


def test_gradient_checkpointing_gives_the_same_gradients():
    """The memory's inputs travel with the layer's keyword arguments, so a checkpointed layer replays
    with them (transformers 5.24 checkpoints `forward` and keeps hooks, hence the memory, outside)."""
    model = _trained(add_memory(_llama(), after_layer=1, memory="both", **POOL)).train()
    ids = torch.randint(0, V, (2, 8))
    calls = []
    model.language_model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer carrying the memory is recomputed
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "memory.gate" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_cached_greedy_generate_equals_uncached_argmax():
    model = _trained(add_memory(_llama(), after_layer=1, memory="both", **POOL))
    ids = torch.randint(1, V, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, ids, 6, mask))
    beams = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **beams), model.generate(ids, use_cache=False, **beams))


def test_save_load_round_trip_with_the_pool_in_its_own_files(tmp_path):
    from safetensors.torch import load_file

    model = _trained(add_memory(_llama(), after_layer=1, memory="both", **POOL))
    model.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "pool.safetensors.index.json").read_text())
    assert set(index["tables"]) == {"ngram.v", "knowledge.u", "knowledge.v"}
    weights = load_file(tmp_path / "model.safetensors")
    assert not any(k.endswith((".u", ".v")) and ".pool." in k for k in weights)
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in weights  # the pretrained keys, unchanged
    ids = torch.randint(0, V, (2, 7))
    expected = model(ids).logits
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), DPSNRRetrofitForCausalLM.from_pretrained(tmp_path, pool_mmap=True)):
        assert isinstance(loaded, DPSNRRetrofitForCausalLM)
        sd, ld = model.state_dict(), loaded.state_dict()
        assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
        assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight  # still tied
        torch.testing.assert_close(loaded.eval()(ids).logits, expected)


def test_remote_code_loads_in_a_process_where_the_package_is_not_importable(tmp_path):
    model = _trained(add_memory(_llama(), after_layer=1, memory="both", **POOL))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "retrofit.DPSNRRetrofitForCausalLM"
    assert cfg["text_config"]["model_type"] == "llama"
    for f in ("configuration_retrofit.py", "retrofit.py", "hashed.py", "pool.py", "reasoning.py", "storage.py"):
        assert (tmp_path / f).exists(), f
    ids = torch.randint(0, V, (1, 6))
    expected = model(ids).logits
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["modeling_dpsnr"] = None  # the installed package must not be used
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        ids = torch.tensor({ids.tolist()})
        print(repr(m.generate(ids, max_new_tokens=3, do_sample=False).tolist()))
        print(repr(m(ids).logits.tolist()))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    *_, gen_line, logits_line = res.stdout.strip().splitlines()
    assert eval(gen_line) == generated.tolist()
    torch.testing.assert_close(torch.tensor(eval(logits_line)), expected)


BAD = [
    (dict(memory="bloom"), "memory"),
    (dict(memory_layer=3), "memory_layer"),  # the Llama has layers 0..2
    (dict(memory_layer=-1), "memory_layer"),
    (dict(memory_pool={"hidden_size": 8}), "memory_pool"),
    (dict(memory_pool={"loop_max_steps": 3}), "memory_loop"),
    (dict(memory_loop=True, memory_pool={"loop_step": "block"}), "loop_step"),
    (dict(memory_loop=True, memory_pool={"loop_halting": "exits"}), "loop_halting"),
    (dict(memory_pool={"pool_topk": 0}), "pool_topk"),
    (dict(memory_pool={"ngram_orders": [3, 3]}), "ngram_orders"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_retrofit_configs_raise_naming_the_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        DPSNRRetrofitConfig(text_config=_llama().config, **overrides)


def test_add_memory_refuses_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="model.model.layers"):
        add_memory(torch.nn.Linear(2, 2), after_layer=0)


def test_lora_on_the_base_trains_with_the_memory():
    peft = pytest.importorskip("peft")
    base = _llama()
    ids = torch.randint(0, V, (2, 8))
    expected = base(ids).logits
    model = add_memory(base, after_layer=1, memory="hashed", **POOL)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in model.memory_parameters():  # PEFT freezes all but its adapters
        p.requires_grad_(True)
    assert torch.equal(lora(input_ids=ids).logits, expected)  # LoRA's B and the memory gate start at zero
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        lora(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert model.memory.gate.abs().sum() > 0
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in lora.named_parameters())
    trained = lora(input_ids=ids).logits
    merged = lora.merge_and_unload()
    assert isinstance(merged, DPSNRRetrofitForCausalLM)
    torch.testing.assert_close(merged(ids).logits, trained, atol=1e-5, rtol=1e-4)
