"""DPSNRTrainer: a `transformers.Trainer` for DPSN-R, assembled from callbacks and small objects.

The stock Trainer trains DPSN-R unchanged, on the dense path. This subclass adds, each in its file:
- the sparse pool optimizer: pool entry tables produce sparse gradients and are updated by
  `SparseRowAdam` (cost O(rows touched), own learning rate, own clipping, no weight decay), the rest
  by AdamW; clipping leaves the sparse pool gradients to the pool optimizer (optimizer.py);
- callbacks (callbacks.py): the ponder warm-up, the reasoning metrics in the logs, the stop on a
  non-finite loss;
- checkpoints written atomically and without pickles, the pool beside the controller (checkpoint_io.py);
- data-parallel runs with sparse pool gradients averaged outside DDP (distributed.py).

What is left here is wiring. Where the Trainer has no public hook, a private method is overridden
or called; PRIVATE_TRAINER_API lists every one, and tests/test_trainer_hooks.py fails, naming the
hook, when a transformers release removes or changes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .callbacks import LossObserver, NonFiniteLossCallback, PonderWarmupCallback, ReasoningMetricsCallback
from .checkpoint_io import CheckpointIO
from .distributed import (
    all_reduce_sparse_grads, exclude_from_ddp, pool_table_names, sparse_grads_supported, unwrap_model,
)
from .optimizer import build_optimizer, clip_controller_grad_norm

# Private Trainer API this package relies on → its parameters (after self), as transformers 5.23–5.24
# define them. Overridden below: the Trainer calls them and offers no public hook for what they do.
# Called: used by CheckpointIO. tests/test_trainer_hooks.py checks each against the installed
# transformers, and that the Trainer still calls the ones overridden here.
PRIVATE_TRAINER_API = {
    # overridden
    "_clip_grad_norm": ("model",),  # clip the controller only; the pool optimizer clips the sparse grads
    "_save_checkpoint": ("model", "trial"),  # atomic, pickle-free checkpoint-N (CheckpointIO)
    "_save": ("output_dir", "state_dict"),  # training_args.json instead of the training_args.bin pickle
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),  # + the pool's own files on resume
    "_load_optimizer_and_scheduler": ("checkpoint",),  # safetensors + JSON, not torch.load
    "_load_rng_state": ("checkpoint",),  # safetensors + JSON, not torch.load
    # called
    "_get_output_dir": ("trial",),
    "save_model": ("output_dir", "_internal_call"),  # the private keyword: a checkpoint, not a final save
}


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
    exit_gate_stage: bool = field(
        default=False,
        metadata={"help": "Ouro's second stage for a model with loop_halting='exits' (start from the first stage's "
                          "folder with --model_name_or_path): every parameter but the exit head is frozen and the head "
                          "learns to stop where the next step stops lowering the token's loss."},
    )

    exit_samples: int | None = field(
        default=None,
        metadata={"help": "For a model with loop_halting='exits': run the coda and LM head on this many of the "
                          "earlier exits per training forward, drawn at random, instead of all of them (an unbiased "
                          "estimate of the expected loss over the exits at a fraction of its cost; the execution "
                          "setting `exit_samples`). None: every exit. Measured on micro: 4-7 percent higher perplexity "
                          "with 1 than with every exit."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.exit_samples is not None and (self.exit_samples < 1 or self.exit_gate_stage):
            raise ValueError(f"exit_samples must be ≥ 1 and applies to the first (expected-loss) stage, not with "
                             f"exit_gate_stage; got exit_samples={self.exit_samples}, exit_gate_stage={self.exit_gate_stage}.")
        if self.pool_optimizer not in ("sparse_row_adam", "dense"):
            raise ValueError(f"pool_optimizer must be 'sparse_row_adam' or 'dense', got {self.pool_optimizer!r}")
        if not 0.0 <= self.ponder_warmup_ratio < 1.0:
            raise ValueError(f"ponder_warmup_ratio must be in [0, 1), got {self.ponder_warmup_ratio}")
        if not self.pool_learning_rate > 0:
            raise ValueError(f"pool_learning_rate must be > 0, got {self.pool_learning_rate}")


def enter_exit_gate_stage(model) -> None:
    """Freeze every parameter but the trained-exit head and train it on the gate objective (Ouro's
    second stage; halting.TrainedExits.gate_loss)."""
    if getattr(model.config, "loop_halting", None) != "exits":
        raise ValueError(f"exit_gate_stage trains the exit head of a model with loop_halting='exits'; this model has "
                         f"loop_halting={getattr(model.config, 'loop_halting', None)!r}.")
    head = {id(p) for p in model.model.loop.policy.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    model.set_execution(exit_objective="gate")


class DPSNRTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = unwrap_model(self.model)
        if not hasattr(model, "pool"):
            raise ValueError(f"DPSNRTrainer trains DPSN-R models; got {type(model).__name__}")
        self.sparse_pool = getattr(self.args, "pool_optimizer", "dense") == "sparse_row_adam"
        # Sparse tensors do not exist on XLA: there the pool keeps its own learning rate and no
        # weight decay, but takes dense gradients in an AdamW group (clipped with the controller).
        self.sparse_grads = self.sparse_pool and sparse_grads_supported(self.args.device)
        model.set_execution(pool_sparse_grads=self.sparse_grads)  # a runtime plan: never saved in config.json
        if getattr(self.args, "exit_gate_stage", False):
            enter_exit_gate_stage(model)
        exit_samples = getattr(self.args, "exit_samples", None)
        if exit_samples is not None:
            if getattr(model.config, "loop_halting", None) != "exits":
                raise ValueError(f"exit_samples samples the trained exits of a model with loop_halting='exits'; this "
                                 f"model has loop_halting={getattr(model.config, 'loop_halting', None)!r}.")
            model.set_execution(exit_samples=exit_samples)
        self._pool_param_ids = {id(p) for p in model.pool.entry_parameters()}
        # DDP cannot reduce sparse gradients of plain parameters: the tables are left out of DDP
        # and their gradients averaged after each synchronising backward (distributed.py).
        self._reduce_pool_grads = self.sparse_grads and self.args.world_size > 1
        if self._reduce_pool_grads:
            exclude_from_ddp(self.model, pool_table_names(self.model))
        self.metrics = ReasoningMetricsCallback(getattr(self.args, "log_pool_usage", True))
        self.checkpoints = CheckpointIO(self)
        # Order matters once: before the optimizer step the warm-up restores the ponder weight,
        # then a non-finite loss stops the run.
        for callback in (PonderWarmupCallback(getattr(self.args, "ponder_warmup_ratio", 0.0)), self.metrics,
                         NonFiniteLossCallback(), self.checkpoints):
            self.add_callback(callback)

    # ------------------------------------------------------------------ public Trainer hooks
    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self.sparse_pool:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        self.optimizer = build_optimizer(opt_model, self.args, decay, self._pool_param_ids, self.sparse_grads)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        core = unwrap_model(model)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LossObserver):
                callback.on_loss(self.args, self.state, model=core, inputs=inputs, outputs=outputs, loss=loss,
                                 num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._reduce_pool_grads and self.accelerator.sync_gradients:  # before clipping and the step
            all_reduce_sparse_grads(unwrap_model(model).pool.entry_parameters())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.metrics.window_logs(logs))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ private Trainer hooks (PRIVATE_TRAINER_API)
    def _clip_grad_norm(self, model):
        if not self.sparse_grads:
            return super()._clip_grad_norm(model)
        return clip_controller_grad_norm(model, self._pool_param_ids, self.args.max_grad_norm)

    def _save_checkpoint(self, model, trial):
        self.checkpoints.save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        self.checkpoints.save_model_files(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # model.safetensors
        self.checkpoints.load_pool(model if model is not None else self.model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        self.checkpoints.load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        self.checkpoints.load_rng_state(checkpoint)
