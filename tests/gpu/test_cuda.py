"""DPSN-R on CUDA agrees with the CPU reference, and trains there with the project's tools.

Skipped without a CUDA device. `scripts/check_gpu.sh` runs this file and prints what each test
measured. Float32 comparisons run with TF32 off (see conftest.py); bf16 is checked for finiteness
and for learning, not for equality.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from conftest import TINY, tiny_model  # tests/conftest.py (this folder's own conftest is gpu.conftest)
from modeling_dpsnr import DPSNRForCausalLM
from dpsnr.training.pool_optim import SparseRowAdam
from dpsnr.training.optimizer import ChainedOptimizer
from dpsnr.training.trainer import DPSNRTrainer, DPSNRTrainingArguments

CUDA = torch.device("cuda")
COORD = dict(pool_retrieval="coordinate", indexer_window=4, pool_size=400)
RETRIEVALS = {"product_key": {}, "coordinate": COORD}

def _ids(b: int = 3, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return (g.to_dense() if g.is_sparse else g).float().cpu()


@pytest.mark.parametrize("retrieval", list(RETRIEVALS))
@pytest.mark.parametrize("loop_mode", ["eager", "static"])
def test_forward_and_gradients_match_the_cpu(retrieval, loop_mode, record):
    cpu = tiny_model(execution={"loop_mode": loop_mode, "pool_sparse_grads": True}, **RETRIEVALS[retrieval]).train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids = _ids()
    ref = cpu(ids, labels=ids)
    out = gpu(ids.to(CUDA), labels=ids.to(CUDA))
    ref.loss.backward()
    out.loss.backward()

    assert out.logits.device.type == "cuda"
    assert torch.equal(out.reasoning_steps.cpu(), ref.reasoning_steps)
    logit_diff = (out.logits.detach().cpu() - ref.logits.detach()).abs().max().item()
    grads = dict(gpu.named_parameters())
    grad_diff, sparse = 0.0, []
    for name, p in cpu.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        if p.grad.is_sparse:
            sparse.append(name)
            assert grads[name].grad.is_sparse, f"{name}: sparse on the CPU, dense on CUDA"
        scale = max(1.0, _dense_grad(p).abs().max().item())
        grad_diff = max(grad_diff, (_dense_grad(grads[name]) - _dense_grad(p)).abs().max().item() / scale)
    record(f"forward_backward[{retrieval},{loop_mode}]", logits_max_abs_diff=logit_diff,
           grad_max_rel_diff=grad_diff, sparse_grad_tables=len(sparse))
    assert sparse, "the pool tables should get sparse gradients"
    assert logit_diff < 1e-4
    assert grad_diff < 1e-4


def test_sparse_row_adam_on_cuda_matches_the_cpu(record):
    torch.manual_seed(0)
    table = torch.randn(1000, 16)
    steps = [(torch.randint(0, 1000, (40,)), torch.randn(40, 16)) for _ in range(5)]
    finals = {}
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(table.clone().to(device))
        opt = SparseRowAdam([p], lr=1e-2, max_grad_norm=1.0)
        for rows, values in steps:
            p.grad = torch.sparse_coo_tensor(rows[None].to(device), values.to(device), p.shape, check_invariants=True)
            opt.step()
        finals[device] = p.detach().cpu()
        assert opt.state[p]["exp_avg"].device.type == device
    diff = (finals["cuda"] - finals["cpu"]).abs().max().item()
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[torch.cat([r for r, _ in steps])] = False
    record("sparse_row_adam", max_abs_diff=diff, untouched_rows=int(untouched.sum()))
    assert diff < 1e-5
    assert torch.equal(finals["cuda"][untouched], table[untouched])


@pytest.mark.parametrize("retrieval", list(RETRIEVALS))
def test_cached_greedy_generation_on_cuda_equals_the_cpu(retrieval, record):
    cpu = tiny_model(**RETRIEVALS[retrieval]).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    prompt = _ids(2, 6, seed=1)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = cpu.generate(prompt, **kw)
    cached = gpu.generate(prompt.to(CUDA), use_cache=True, **kw)
    uncached = gpu.generate(prompt.to(CUDA), use_cache=False, **kw)
    tokens, stats = gpu.generate(prompt.to(CUDA), return_reasoning_stats=True, **kw)
    record(f"generate[{retrieval}]", new_tokens=int(ref.shape[1] - prompt.shape[1]))
    assert torch.equal(cached.cpu(), uncached.cpu())
    assert torch.equal(cached.cpu(), ref)
    assert torch.equal(tokens.cpu(), ref)
    assert stats["steps"].shape == (2, kw["max_new_tokens"]) and stats["steps"].device.type == "cuda"


def test_bf16_autocast_training_steps_learn(record):
    model = tiny_model().to(CUDA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _ids(8, 32).to(CUDA)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        assert all(torch.isfinite(_dense_grad(p)).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    record("bf16_autocast", first_loss=losses[0], last_loss=losses[-1])
    assert losses[-1] < 0.7 * losses[0], losses  # one repeated batch: it must be memorised


def test_memory_mapped_pool_with_the_controller_on_cuda(tmp_path, record):
    model = tiny_model(**COORD).eval()
    model.save_pretrained(tmp_path / "ckpt")
    placed = DPSNRForCausalLM.from_pretrained(tmp_path / "ckpt", pool_mmap=True, device_map="cuda:0")
    tables = {id(t) for t in placed.pool.entry_parameters()}
    assert {t.device.type for t in placed.pool.entry_parameters()} == {"cpu"}  # the tables stay mapped
    assert {p.device.type for p in placed.parameters() if id(p) not in tables} == {"cuda"}
    ids = _ids(2, 16)
    ref = model(ids).logits
    got = placed(ids.to(CUDA)).logits
    diff = (got.cpu() - ref).abs().max().item()
    tokens = placed.generate(ids[:, :4].to(CUDA), max_new_tokens=6, do_sample=False, pad_token_id=0)
    record("mmap_pool_controller_on_cuda", logits_max_abs_diff=diff)
    assert got.device.type == "cuda"
    assert diff < 1e-4
    assert torch.equal(tokens.cpu(), model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("bf16", [False, True])
def test_dpsnr_trainer_trains_on_cuda_with_sparse_pool_updates(tmp_path, bf16, record):
    ids = _ids(16, 32)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = tiny_model()
    tables = {id(t) for t in model.pool.entry_parameters()}
    pool_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in tables}
    args = DPSNRTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
        pool_learning_rate=1e-2, logging_steps=10, save_strategy="steps", save_steps=20, report_to=[],
        disable_tqdm=True, seed=0, bf16=bf16, ponder_warmup_ratio=0.5,
    )
    trainer = DPSNRTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    chained = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(chained, ChainedOptimizer)
    pool_opt = next(o for o in chained.optimizers if isinstance(o, SparseRowAdam))
    assert all(s["exp_avg"].device.type == "cuda" for s in pool_opt.state.values())
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    changed = sum(not torch.equal(p.detach().cpu(), pool_before[n]) for n, p in model.named_parameters() if n in pool_before)
    record(f"trainer[bf16={bf16}]", first_lm_loss=logs[0]["lm_loss"], last_lm_loss=logs[-1]["lm_loss"],
           pool_tensors_changed=changed)
    assert logs[-1]["lm_loss"] < logs[0]["lm_loss"]
    assert changed == len(pool_before) > 0

    # resume from the step-20 checkpoint on the GPU: reaches the same step with finite losses
    resumed = DPSNRTrainer(model=tiny_model(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-20"))
    assert resumed.state.global_step == 40
    assert next(resumed.model.parameters()).device.type == "cuda"


def test_compiled_static_loop_matches_eager_on_cuda(record):
    model = tiny_model(execution={"loop_mode": "static"}).to(CUDA).eval()
    ids = _ids(2, 16).to(CUDA)
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model)
        got = compiled(ids).logits
        again = compiled(_ids(2, 16, seed=5).to(CUDA)).logits  # a new batch of the same shape
    diff = (got - ref).abs().max().item()
    record("torch_compile_static", logits_max_abs_diff=diff)
    assert diff < 1e-4
    assert torch.isfinite(again).all()


def test_compiled_static_cache_generation_on_cuda_equals_the_cpu(record):
    # The presets' layout (block step, hashed n-grams in the prelude, unit keys): on CUDA, transformers compiles a
    # static-cache decoding step by itself (CUDA graphs); the tokens must be the CPU's dynamic-cache ones.
    layout = dict(loop_step="block", loop_halting="fixed", pool_partitions={"shared": 0.8, "ngram": 0.2},
                  pool_partition_retrieval={"ngram": "hashed_ngram"}, ngram_prelude_partition="ngram", ngram_heads=2,
                  loop_phase_schedule=["shared"] * 4, pool_query_norm="running", pool_key_norm="unit")
    cpu = tiny_model(**layout).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    prompt = _ids(2, 6, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = cpu.generate(prompt, **kw)
    torch._dynamo.reset()
    got, stats = gpu.generate(prompt.to(CUDA), cache_implementation="static", return_reasoning_stats=True, **kw)
    record("generate_static_compiled", new_tokens=int(ref.shape[1] - prompt.shape[1]))
    assert torch.equal(got.cpu(), ref)
    assert stats["steps"].shape == (2, kw["max_new_tokens"])
