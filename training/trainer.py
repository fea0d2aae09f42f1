"""DPSNRTrainer: `transformers.Trainer` with a sparse pool optimizer, DPSN-R metrics and safe checkpoints.

What it adds to the stock Trainer (which also trains DPSN-R unchanged, on the dense path):
- pool entry tables produce sparse gradients and are updated by `SparseRowAdam` (cost O(rows
  touched), own learning rate, own clipping, no weight decay); everything else uses AdamW;
- gradient clipping of the controller that leaves the sparse pool gradients to the pool optimizer;
- logs `lm_loss`, `ponder_loss`, average reasoning steps and, per partition, % of rows read and
  KL(usage ‖ uniform) over each logging window (Lample et al. 2019 report the same two numbers);
  evaluation adds `eval_lm_loss` and `eval_perplexity` (from the LM loss only, never the ponder term);
- checkpoints written atomically (a hidden temporary folder renamed into place) and without
  pickles (optimizer, scheduler and RNG state as safetensors + JSON);
- a non-finite loss stops the run with a clear error before any optimizer step, so the last good
  checkpoint is untouched.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .checkpoint_io import load_state, save_state, state_exists
from .distributed import all_reduce_sparse_grads, exclude_from_ddp, pool_table_names, sparse_grads_supported
from .pool_optim import SparseRowAdam, clip_grad_norm_
from .pool_usage import kl_to_uniform

logger = logging.get_logger(__name__)

OPTIMIZER_STATE = "optimizer_state"
SCHEDULER_STATE = "scheduler_state"


@dataclass
class DPSNRTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the pool's own optimizer settings."""

    pool_optimizer: str = field(
        default="sparse_row_adam",
        metadata={"help": "'sparse_row_adam' (sparse pool gradients, lazy row-wise Adam) or 'dense' (AdamW on everything).",
                  "choices": ["sparse_row_adam", "dense"]},
    )
    pool_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the pool tables."})
    pool_rowwise_second_moment: bool = field(
        default=False, metadata={"help": "One second-moment scalar per pool row (optimizer memory ≈ 1× pool)."}
    )
    pool_max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the pool's (sparse) gradients to this norm; None disables."}
    )
    log_pool_usage: bool = field(default=True, metadata={"help": "Log % rows read and KL to uniform per partition."})
    ponder_warmup_ratio: float = field(
        default=0.25,
        metadata={"help": "Fraction of training steps during which the ponder term is left out of the loss. While the "
                          "pool is still useless the ponder cost is the only signal the halting head gets, and Adam turns "
                          "even a tiny weight into full-size steps: halting collapses to one step within ~10 updates "
                          "(measured on micro) and later partitions never train. 0 disables."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.pool_optimizer not in ("sparse_row_adam", "dense"):
            raise ValueError(f"pool_optimizer must be 'sparse_row_adam' or 'dense', got {self.pool_optimizer!r}")
        if not 0.0 <= self.ponder_warmup_ratio < 1.0:
            raise ValueError(f"ponder_warmup_ratio must be in [0, 1), got {self.ponder_warmup_ratio}")
        if not self.pool_learning_rate > 0:
            raise ValueError(f"pool_learning_rate must be > 0, got {self.pool_learning_rate}")


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers behind one `Optimizer` face, so the Trainer's scheduler, accelerate and
    checkpointing see one object: `param_groups` is their concatenation (the LR schedule scales
    every group, each from its own base learning rate)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self):
        merged = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        for opt, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(sd)

    def __repr__(self):
        return f"ChainedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class DPSNRTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = _unwrap(self.model)
        if not hasattr(model, "pool"):
            raise ValueError(f"DPSNRTrainer trains DPSN-R models; got {type(model).__name__}")
        self.sparse_pool = getattr(self.args, "pool_optimizer", "dense") == "sparse_row_adam"
        # Sparse tensors do not exist on XLA: there the pool keeps its own learning rate and no
        # weight decay, but takes dense gradients in an AdamW group (clipped with the controller).
        self.sparse_grads = self.sparse_pool and sparse_grads_supported(self.args.device)
        model.set_execution(pool_sparse_grads=self.sparse_grads)  # a runtime plan: never saved in config.json
        self._pool_param_ids = {id(p) for p in model.pool.entry_parameters()}
        # DDP cannot reduce sparse gradients of plain parameters: the tables are left out of DDP
        # and their gradients averaged after each synchronising backward (training/distributed.py).
        self._reduce_pool_grads = self.sparse_grads and self.args.world_size > 1
        if self._reduce_pool_grads:
            exclude_from_ddp(self.model, pool_table_names(self.model))
        self._reset_window()
        self._eval_sums = {"lm": 0.0, "steps": 0.0, "tokens": 0}
        self._usage = None

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self.sparse_pool:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if id(p) not in self._pool_param_ids]
        pool = [p for n, p in named if id(p) in self._pool_param_ids]
        groups = [
            {"params": [p for n, p in dense if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in dense if n not in decay], "weight_decay": 0.0},
        ]
        if not self.sparse_grads:  # XLA: the pool as a dense group with its own learning rate
            groups.append({"params": pool, "weight_decay": 0.0, "lr": self.args.pool_learning_rate})
        adamw = torch.optim.AdamW(
            groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        if not self.sparse_grads:
            self.optimizer = adamw
            return self.optimizer
        pool_opt = SparseRowAdam(
            pool, lr=self.args.pool_learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon, rowwise_second_moment=self.args.pool_rowwise_second_moment,
            max_grad_norm=self.args.pool_max_grad_norm,
        )
        self.optimizer = ChainedOptimizer([adamw, pool_opt])
        return self.optimizer

    def _clip_grad_norm(self, model):
        """Clip the controller's dense gradients; the pool optimizer clips the sparse ones itself.
        Returns the norm over all gradients (dense and sparse) before clipping, for logging."""
        if not self.sparse_grads:
            return super()._clip_grad_norm(model)
        params = [p for p in model.parameters() if p.grad is not None]
        dense = [p for p in params if id(p) not in self._pool_param_ids]
        sparse = [p for p in params if id(p) in self._pool_param_ids]
        max_norm = self.args.max_grad_norm
        if max_norm and max_norm > 0:
            dense_norm = clip_grad_norm_(dense, max_norm).float()
        else:
            dense_norm = torch.sqrt(sum((p.grad.float().pow(2).sum() for p in dense), torch.zeros(())))
        pool_sq = torch.zeros(())
        for p in sparse:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()  # once here; SparseRowAdam skips its own dedup for coalesced grads
                pool_sq = pool_sq + p.grad.values().float().pow(2).sum()
            else:
                pool_sq = pool_sq + p.grad.float().pow(2).sum()
        return torch.sqrt(dense_norm**2 + pool_sq)

    # ------------------------------------------------------------------ loss and metrics
    def _reset_window(self):
        self._window = {"lm": 0.0, "ponder": 0.0, "steps": 0.0, "n": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = _unwrap(model)
        if core.training and self.args.log_pool_usage:
            with core.pool.track_usage(self._usage) as usage:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self._usage = usage
        else:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if core.training and outputs.lm_loss is not None and self._in_ponder_warmup():
            cfg = core.config
            if core.model.loop.policy.has_loss and cfg.loop_ponder_weight > 0:  # else the loss is the LM loss already
                # Keep the factor the Trainer applied to the model's loss (× processes under DDP with
                # average_tokens_across_devices; in place, so `outputs.loss` carries it too), or DDP
                # would take half-size steps during the warmup. The model's own loss, unscaled:
                model_loss = outputs.lm_loss + cfg.loop_ponder_weight * outputs.ponder_loss.to(outputs.lm_loss.dtype)
                loss = outputs.lm_loss * (loss / model_loss).detach()
        mask = inputs.get("attention_mask")
        steps = outputs.reasoning_steps.float()
        mean_steps = (steps * mask).sum() / mask.sum().clamp(min=1) if mask is not None else steps.mean()
        if core.training:
            w = self._window
            if outputs.lm_loss is not None:
                w["lm"] += outputs.lm_loss.detach().float().item()
                w["ponder"] += outputs.ponder_loss.detach().float().item()
            w["steps"] += mean_steps.item()
            w["n"] += 1
        elif outputs.lm_loss is not None:
            # token-weighted, so eval_lm_loss is the mean NLL per predicted token
            labels = inputs["labels"]
            n_tok = int((labels[:, 1:] != -100).sum())
            lm = outputs.lm_loss.detach().float().item()
            if num_items_in_batch is not None:  # loss already summed over tokens / num_items
                lm = lm * float(num_items_in_batch) / max(n_tok, 1)
            self._eval_sums["lm"] += lm * n_tok
            self._eval_sums["steps"] += mean_steps.item() * n_tok
            self._eval_sums["tokens"] += n_tok
        return (loss, outputs) if return_outputs else loss

    def _in_ponder_warmup(self) -> bool:
        ratio = getattr(self.args, "ponder_warmup_ratio", 0.0)
        return ratio > 0 and self.state.global_step < ratio * self.state.max_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}) at step {self.state.global_step + 1}; stopping before the "
                f"optimizer step. The last good checkpoint is {last or 'none (no checkpoint saved yet)'}. Lower the "
                "learning rate(s), enable gradient clipping, or check the data."
            )
        if self._reduce_pool_grads and self.accelerator.sync_gradients:
            all_reduce_sparse_grads(_unwrap(model).pool.entry_parameters())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window["n"]:
            w = self._window
            logs["lm_loss"] = round(w["lm"] / w["n"], 4)
            logs["ponder_loss"] = round(w["ponder"] / w["n"], 4)
            logs["avg_steps"] = round(w["steps"] / w["n"], 3)
            if self._usage is not None:
                logs.update(pool_usage_logs(self._usage))
                for stats in self._usage.values():
                    stats["counts"].zero_()
                    stats["mass"].zero_()
            self._reset_window()
        if any(k.startswith("eval_") for k in logs) and self._eval_sums["tokens"]:
            e = self._eval_sums
            prefix = next(k for k in logs if k.startswith("eval_")).split("_")[0]
            lm = e["lm"] / e["tokens"]
            logs[f"{prefix}_lm_loss"] = round(lm, 4)
            logs[f"{prefix}_perplexity"] = round(math.exp(min(lm, 50.0)), 3)
            logs[f"{prefix}_avg_steps"] = round(e["steps"] / e["tokens"], 3)
            self._eval_sums = {"lm": 0.0, "steps": 0.0, "tokens": 0}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints without pickles
    def _save_checkpoint(self, model, trial):
        """Write `checkpoint-N` atomically: everything goes to a hidden temporary folder first, which
        is renamed into place once complete, so a crash never leaves a half-written checkpoint
        that `get_last_checkpoint` would pick up."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".tmp-{name}")
        if self.args.should_save and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.save_model(tmp, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(tmp)
            self._save_rng_state(tmp)
        if self.args.should_save:
            self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(tmp)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Trainer restores `model.safetensors`; the pool lives in its own files beside it."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        core = _unwrap(model if model is not None else self.model)
        if hasattr(core, "load_pool"):
            core.load_pool(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        core = _unwrap(self.model)
        if self.state.best_model_checkpoint and hasattr(core, "load_pool"):
            core.load_pool(self.state.best_model_checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # The arguments as JSON instead of the stock `training_args.bin` pickle.
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_STATE))
            save_state(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        prefix = os.path.join(checkpoint, OPTIMIZER_STATE)
        if not state_exists(prefix):
            logger.warning(f"No optimizer state in {checkpoint}; the optimizer starts fresh.")
            return
        self.optimizer.load_state_dict(load_state(prefix))
        self.lr_scheduler.load_state_dict(load_state(os.path.join(checkpoint, SCHEDULER_STATE)))

    def _rng_prefix(self, folder):
        suffix = "" if self.args.world_size <= 1 else f"_{self.args.process_index}"
        return os.path.join(folder, f"rng_state{suffix}")

    def _save_rng_state(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.random.get_rng_state_all()
        save_state(state, self._rng_prefix(output_dir))

    def _load_rng_state(self, checkpoint):
        if checkpoint is None or not state_exists(self._rng_prefix(checkpoint)):
            return
        state = load_state(self._rng_prefix(checkpoint))
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state(tuple(state["numpy"]))
        torch.random.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.random.set_rng_state_all(state["cuda"])


def pool_usage_logs(usage: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per partition: % of rows read in the window and KL(read distribution ‖ uniform) in nats."""
    logs = {}
    for name, stats in usage.items():
        counts = stats["counts"].detach().cpu()  # on the host: the statistics use data-dependent shapes
        kl = kl_to_uniform(counts)
        if kl is None:  # no row read in this window
            continue
        logs[f"pool_{name}_read_pct"] = round(100.0 * float((counts > 0).double().mean()), 3)
        logs[f"pool_{name}_kl_uniform"] = round(kl, 4)
    return logs


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
