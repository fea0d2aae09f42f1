"""Training: DPSNRTrainer and the stock Trainer, checkpoints that survive SIGKILL, early input errors."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modeling_dpsnr import DPSNRForCausalLM
from dpsnr.training.pool_optim import SparseRowAdam
from dpsnr.training.train import main, parse_args
from dpsnr.training.optimizer import ChainedOptimizer
from dpsnr.training.trainer import DPSNRTrainer, DPSNRTrainingArguments

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configuration" / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configuration" / "accelerate").glob("*.yaml"))
DEBUG_RECIPE = ROOT / "configuration" / "recipes" / "debug-tinystories.yaml"


def _dataset(n=32, T=16, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(cls, out, **kw):
    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return cls(**base)


def test_dpsnr_trainer_uses_sparse_pool_updates_and_logs_reasoning_metrics(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    read = {name: torch.zeros(part.num_entries, dtype=torch.bool) for name, part in model.pool.partitions.items()}
    trainer = DPSNRTrainer(model=model, args=_args(DPSNRTrainingArguments, tmp_path, pool_learning_rate=1e-2,
                                                   ponder_warmup_ratio=0.5), train_dataset=_dataset())
    assert model.execution.pool_sparse_grads and "pool_sparse_grads" not in model.config.to_dict()
    # record every row any forward reads, to check untouched rows stay bit-identical
    original = model.pool.forward

    def recording(partition, query_input, x, *args, **kw):
        out, r = model.pool.partitions[partition](query_input, x, *args, **kw)
        read[partition][r.indices.flatten()] = True
        return original(partition, query_input, x, *args, **kw)

    model.pool.forward = recording
    result = trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(optimizer, ChainedOptimizer)
    assert any(isinstance(o, SparseRowAdam) for o in optimizer.optimizers)
    for name, part in model.pool.partitions.items():
        for t, table in part.entry_tables().items():
            key = f"model.loop.pool.partitions.{name}.{t}"
            changed = (table.detach() != before[key]).any(-1)
            assert changed.any(), key
            assert not changed[~read[name]].any(), f"{key}: rows never read were updated"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"lm_loss", "ponder_loss", "avg_steps"} <= logs[-1].keys()
    assert any(k.startswith("pool_knowledge_read_pct") for k in logs[-1])
    assert any(k.endswith("_kl_uniform") for k in logs[-1])
    assert result.training_loss == result.training_loss  # finite


def test_plain_transformers_trainer_trains_the_dense_path(tmp_path):
    model = tiny_model()
    ds = _dataset()
    batch = torch.tensor(ds[:8]["input_ids"])
    before = model(batch, labels=batch).lm_loss.item()
    Trainer(model=model, args=_args(TrainingArguments, tmp_path, max_steps=15), train_dataset=ds).train()
    assert not model.execution.pool_sparse_grads
    assert model(batch, labels=batch).lm_loss.item() < before - 0.05


def test_ponder_warmup_leaves_the_ponder_term_out_and_checkpoints_keep_the_configured_weight(tmp_path):
    model = tiny_model()
    weight = model.config.loop_ponder_weight
    args = _args(DPSNRTrainingArguments, tmp_path, ponder_warmup_ratio=0.5, logging_steps=1, save_strategy="steps",
                 save_steps=2)
    DPSNRTrainer(model=model, args=args, train_dataset=_dataset()).train()
    logs = {h["step"]: h for h in model_logs(tmp_path / "checkpoint-8")}
    for step in (1, 2, 3, 4):  # global steps 0..3 < 0.5 × 8: the loss is the LM loss alone
        assert logs[step]["loss"] == pytest.approx(logs[step]["lm_loss"], abs=1e-4)
    for step in (5, 6, 7, 8):
        with_ponder = logs[step]["lm_loss"] + weight * logs[step]["ponder_loss"]
        assert logs[step]["loss"] == pytest.approx(with_ponder, abs=1e-3) and weight * logs[step]["ponder_loss"] > 1e-2
    assert json.loads((tmp_path / "checkpoint-2" / "config.json").read_text())["loop_ponder_weight"] == weight
    assert model.config.loop_ponder_weight == weight


def model_logs(checkpoint: Path) -> list[dict]:
    return [h for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_checkpoints_hold_no_pickles_and_resume(tmp_path):
    args = _args(DPSNRTrainingArguments, tmp_path, save_strategy="steps", save_steps=4)
    DPSNRTrainer(model=tiny_model(), args=args, train_dataset=_dataset()).train()
    ckpt = Path(get_last_checkpoint(str(tmp_path)))
    names = {p.name for p in ckpt.iterdir()}
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))], names
    assert {"model.safetensors", "optimizer_state.safetensors", "rng_state.safetensors", "trainer_state.json"} <= names
    resumed = DPSNRTrainer(model=tiny_model(), args=_args(DPSNRTrainingArguments, tmp_path, max_steps=10),
                           train_dataset=_dataset())
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 10


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model()
    args = _args(DPSNRTrainingArguments, tmp_path, max_steps=8, save_strategy="steps", save_steps=3)
    trainer = DPSNRTrainer(model=model, args=args, train_dataset=_dataset())
    calls = {"n": 0}
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature Trainer inspects to pick input columns
    def poisoned(*a, **kw):
        out = forward(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(FloatingPointError, match="Non-finite training loss.*checkpoint-3"):
        trainer.train()
    weights = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "checkpoint-6").exists()


def _train_cmd(out, extra=()):
    return [sys.executable, "-m", "dpsnr", "train", "--config", str(DEBUG_RECIPE), "--output_dir", str(out), *extra]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    # One thread: with two, two uninterrupted runs of the block-step preset already differ after 10
    # steps (up to 1e-5 in pool rows, 1e-7 in the controller: some CPU kernel accumulates in a
    # thread-dependent order); the comparison here is about resuming, not kernel determinism.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full), cwd=ROOT, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    # Slow the run down after its first checkpoint (sleep only; the numbers are untouched) so the
    # SIGKILL lands between checkpoints.
    slow = textwrap.dedent(f"""
        import sys, time
        from dpsnr.training import trainer as t
        step = t.DPSNRTrainer.training_step
        def slow_step(self, *a, **k):
            out = step(self, *a, **k)
            if self.state.global_step >= 10:
                time.sleep(0.5)
            return out
        t.DPSNRTrainer.training_step = slow_step
        from dpsnr.training.train import main
        main({[str(x) for x in _train_cmd(killed)[4:]]!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-10").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    assert get_last_checkpoint(str(killed)).endswith("checkpoint-10")
    # a half-written checkpoint (as a crash mid-save would leave) is never picked up
    (killed / ".tmp-checkpoint-20").mkdir()
    (killed / ".tmp-checkpoint-20" / "model.safetensors").write_bytes(b"garbage")

    subprocess.run(_train_cmd(killed, ["--resume", "true"]), cwd=ROOT, env=env, check=True, capture_output=True)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_bad_inputs_fail_before_training(tmp_path):
    base = ["--config", str(DEBUG_RECIPE), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        main(base + ["--train_file", str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        main(base + ["--train_file", str(empty), "--tokenizer", "gpt2", "--config_overrides", "{vocab_size: 50257}"])
    with pytest.raises(ValueError, match="vocab_size is 512"):
        main(base + ["--tokenizer", "gpt2"])  # 50257-token tokenizer, debug model of 512
    with pytest.raises(ValueError, match="block_size=1024.*max_position_embeddings=256"):
        main(base + ["--block_size", "1024"])
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_parses(recipe):
    model_args, data_args, train_args, run_args = parse_args(["--config", str(recipe)])
    assert model_args.preset or model_args.model_name_or_path
    assert train_args.output_dir


def test_recipe_with_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: micro\ntrain_file: x.txt\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args(["--config", str(bad)])


@pytest.mark.parametrize("path", ACCELERATE, ids=[a.name for a in ACCELERATE])
def test_every_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1
    assert cfg.distributed_type is not None


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_a_folder_saved_by_dpsnr_trainer_fine_tunes_with_a_plain_trainer(tmp_path, gradient_checkpointing):
    """The sparse pool gradients DPSNRTrainer uses are a runtime plan, never saved: the folder it
    writes loads dense, so a stock Trainer (AdamW, default gradient clipping) fine-tunes it."""
    model = tiny_model()
    trainer = DPSNRTrainer(model=model, args=_args(DPSNRTrainingArguments, tmp_path / "run"), train_dataset=_dataset())
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not {"pool_sparse_grads", "loop_mode"} & saved.keys()

    loaded = DPSNRForCausalLM.from_pretrained(tmp_path / "saved")
    assert not loaded.execution.pool_sparse_grads
    pool_before = loaded.pool["knowledge"].v.detach().clone()
    ds = _dataset(seed=1)
    batch = torch.tensor(ds[:8]["input_ids"])
    before = loaded(batch, labels=batch).lm_loss.item()
    # transformers 5.24 renamed the argument (the old name still works there, with a warning)
    name = next(n for n in ("activation_checkpointing", "gradient_checkpointing") if n in TrainingArguments.__dataclass_fields__)
    args = _args(TrainingArguments, tmp_path / "ft", max_steps=10, max_grad_norm=1.0, **{name: gradient_checkpointing})
    Trainer(model=loaded, args=args, train_dataset=ds).train()
    assert loaded.pool["knowledge"].v.grad is None or not loaded.pool["knowledge"].v.grad.is_sparse
    assert not torch.equal(loaded.pool["knowledge"].v.detach(), pool_before)  # the pool trained too
    assert loaded(batch, labels=batch).lm_loss.item() < before - 0.05


def test_configs_saved_with_runtime_settings_still_load_without_them(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(pool_sparse_grads=True, loop_mode="static")  # what folders written before the plan hold
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = DPSNRForCausalLM.from_pretrained(tmp_path)
    assert loaded.execution.loop_mode == "auto" and not loaded.execution.pool_sparse_grads
    assert not hasattr(loaded.config, "pool_sparse_grads")
    with pytest.raises(ValueError, match="loop_mode"):
        loaded.set_execution(loop_mode="lazy")
    with pytest.raises(TypeError, match="unknown execution"):
        loaded.set_execution(sparse=True)


def test_exit_gate_stage_trains_only_the_exit_head_towards_stopping_where_steps_stop_helping(tmp_path):
    model = tiny_model(loop_halting="exits")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPSNRTrainer(model=model, args=_args(DPSNRTrainingArguments, tmp_path, exit_gate_stage=True),
                           train_dataset=_dataset())
    assert model.execution.exit_objective == "gate" and "exit_objective" not in model.config.to_dict()
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {"model.loop.policy.exit.weight", "model.loop.policy.exit.bias"}
    ids = torch.tensor(_dataset(n=4)["input_ids"])
    out = model.train()(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.ponder_loss)  # the gate's fit is the whole loss
    with pytest.raises(ValueError, match="loop_halting='exits'"):
        DPSNRTrainer(model=tiny_model(), args=_args(DPSNRTrainingArguments, tmp_path, exit_gate_stage=True),
                     train_dataset=_dataset())


def test_exit_samples_reaches_the_model_as_an_execution_setting_and_trains(tmp_path):
    model = tiny_model(loop_halting="exits")
    trainer = DPSNRTrainer(model=model, args=_args(DPSNRTrainingArguments, tmp_path, exit_samples=1),
                           train_dataset=_dataset())
    assert model.execution.exit_samples == 1 and "exit_samples" not in model.config.to_dict()
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    with pytest.raises(ValueError, match="loop_halting='exits'"):
        DPSNRTrainer(model=tiny_model(), args=_args(DPSNRTrainingArguments, tmp_path, exit_samples=1),
                     train_dataset=_dataset())
    with pytest.raises(ValueError, match="exit_samples"):
        _args(DPSNRTrainingArguments, tmp_path, exit_samples=1, exit_gate_stage=True)
    with pytest.raises(ValueError, match="exit_samples"):
        _args(DPSNRTrainingArguments, tmp_path, exit_samples=0)
