"""DPSN-R trains on XLA (PJRT CPU client): static loop, no CPU fallback, no recompilation per batch.

Three ways in: a plain loop on the XLA device (compared with the eager CPU reference), accelerate's
`Accelerator` (what `accelerate launch --config_file configuration/accelerate/tpu.yaml` gives a
script), and the project's `DPSNRTrainer` (sparse pool optimizer requested: on XLA it falls back to
dense pool gradients in an AdamW group of its own).

"Stops compiling" is checked as: after a few warm-up steps (first forward/backward, first
optimizer step with fresh state, first logging step), the compile count stays flat for the
remaining steps, each on a new batch.
"""

from __future__ import annotations

import pytest
import torch

from modeling_dpsnr import DPSNRForCausalLM

SEQ = 32
BATCH = 4


def _batches(n: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(n)]


def _model(**overrides) -> DPSNRForCausalLM:
    torch.manual_seed(0)
    return DPSNRForCausalLM.from_preset("debug", **overrides)


def _on_xla(model: DPSNRForCausalLM, device) -> DPSNRForCausalLM:
    """Moving to XLA makes new parameters, which unties lm_head from the embedding: tie them again
    (the Trainer does the same in `_move_model_to_device`)."""
    model = model.to(device)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("retrieval", ["product_key", "coordinate"])
def test_training_loop_lowers_without_fallback_and_matches_cpu(retrieval, xla_metrics, record):
    import torch_xla
    import torch_xla.core.xla_model as xm

    overrides = {"pool_retrieval": retrieval}
    steps = 6
    batches = _batches(steps, 512)
    cpu = _model(**overrides).train()
    cpu.set_execution(loop_mode="eager")  # the eager early-exit loop, on the CPU
    ref = cpu(batches[0], labels=batches[0])

    dev = torch_xla.device()
    model = _on_xla(_model(**overrides), dev).train()  # loop_mode "auto": static on XLA
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiles, losses = [], []
    for i, ids in enumerate(batches):
        ids = ids.to(dev)
        out = model(ids, labels=ids)
        out.loss.backward()
        if i == 0:
            first = {k: getattr(out, k).detach() for k in ("loss", "logits", "reasoning_steps")}
        opt.step()
        opt.zero_grad()
        xm.mark_step()
        compiles.append(xla_metrics.compiles())
        losses.append(out.loss.item())

    loss_diff = abs(first["loss"].cpu().item() - ref.loss.item())
    logit_diff = (first["logits"].cpu() - ref.logits.detach()).abs().max().item()
    record(f"loop[{retrieval}]", fallbacks=xla_metrics.fallbacks(), compiles_per_step=compiles,
           first_loss_diff_vs_cpu_eager=loss_diff, first_logits_max_diff_vs_cpu_eager=logit_diff)
    assert not xla_metrics.unexpected_fallbacks(), xla_metrics.fallbacks()
    assert compiles[2:] == [compiles[2]] * (steps - 2), f"recompiling per batch: {compiles}"
    assert torch.equal(first["reasoning_steps"].cpu(), ref.reasoning_steps)
    assert logit_diff < 1e-4 and loss_diff < 1e-4
    assert all(l == l for l in losses)  # finite


def test_accelerate_training_on_xla(xla_metrics, record):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator()
    assert accelerator.distributed_type == DistributedType.XLA
    steps = 6
    data = [{"input_ids": ids, "labels": ids} for ids in torch.cat(_batches(steps, 512))]
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, drop_last=True)
    model = _on_xla(_model(), accelerator.device)  # before the optimizer exists, as accelerate's XLA docs ask
    before = model.pool["knowledge"].v.detach().cpu()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    model.train()
    compiles, losses = [], []
    for batch in loader:  # accelerate's XLA loader marks a step per batch
        out = model(**batch)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.detach())
        compiles.append(xla_metrics.compiles())
    losses = [l.item() for l in losses]

    record("accelerate", fallbacks=xla_metrics.fallbacks(), compiles_per_step=compiles, losses=losses)
    assert len(losses) == steps
    assert not xla_metrics.unexpected_fallbacks(), xla_metrics.fallbacks()
    # counts lag one step (a step's graph compiles when the loader marks the next step)
    assert compiles[3:] == [compiles[3]] * (steps - 3), f"recompiling per batch: {compiles}"
    assert all(l == l for l in losses)  # finite
    assert not torch.equal(model.pool["knowledge"].v.detach().cpu(), before)  # the pool trained
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dpsnr_trainer_on_xla(tmp_path, xla_metrics, record):
    from datasets import Dataset
    from transformers import TrainerCallback

    from dpsnr.training.trainer import DPSNRTrainer, DPSNRTrainingArguments

    steps = 8
    ids = torch.cat(_batches(steps, 512)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    compiles = []

    class CountCompiles(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            compiles.append(xla_metrics.compiles())

    args = DPSNRTrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=3e-3,
        pool_learning_rate=1e-2, logging_steps=2, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        ponder_warmup_ratio=0.0, dataloader_drop_last=True,
    )
    model = _model()
    before = model.pool["knowledge"].v.detach().clone()
    trainer = DPSNRTrainer(model=model, args=args, train_dataset=dataset, callbacks=[CountCompiles()])
    assert args.device.type == "xla"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied after the move
    assert trainer.sparse_pool and not trainer.sparse_grads  # sparse requested, dense on XLA
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    record("dpsnr_trainer", fallbacks=xla_metrics.fallbacks(), compiles_per_step=compiles,
           losses=[h["loss"] for h in logs], optimizer=repr(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).split("(")[0])
    assert not xla_metrics.unexpected_fallbacks(), xla_metrics.fallbacks()
    assert compiles[4:] == [compiles[4]] * (steps - 4), f"recompiling per batch: {compiles}"
    assert {"lm_loss", "ponder_loss", "avg_steps", "pool_knowledge_read_pct"} <= logs[-1].keys()
    groups = getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups
    pool_ids = {id(p) for p in model.pool.entry_parameters()}
    assert any(g["initial_lr"] == args.pool_learning_rate and g["weight_decay"] == 0.0
               and {id(p) for p in g["params"]} == pool_ids for g in groups), "the pool trains as its own group, no decay"
    assert not torch.equal(model.pool["knowledge"].v.detach().cpu(), before)
