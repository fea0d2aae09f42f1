"""DPSN-R's additions to a training run, as `TrainerCallback`s (DPSNRTrainer adds them).

- `PonderWarmupCallback`: the ponder term stays out of the loss for the first steps;
- `ReasoningMetricsCallback`: `lm_loss`, `ponder_loss`, mean reasoning steps and per-partition pool
  usage over each logging window; `eval_lm_loss` / `eval_perplexity` from the LM loss only;
- `NonFiniteLossCallback`: a non-finite loss stops the run before the optimizer steps, so the last
  good checkpoint is untouched.

TrainerCallback events do not carry a forward's outputs or its loss. Callbacks that need them are
also `LossObserver`s: DPSNRTrainer.compute_loss hands every forward it computes a loss from
(training and evaluation) to their `on_loss`.
"""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .pool_usage import kl_to_uniform


class LossObserver:
    """Mixin for a callback that sees each forward DPSNRTrainer computes a loss from.

    `model` is the unwrapped model (its `.training` tells training from evaluation), `outputs` its
    output and `loss` what the Trainer made of it (scaled for gradient accumulation / processes).
    """

    def on_loss(self, args, state, *, model, inputs, outputs, loss, num_items_in_batch) -> None:
        pass


class PonderWarmupCallback(TrainerCallback):
    """Leaves the ponder term out of the loss for the first `ratio` of the training steps.

    While the pool is still useless the ponder cost is the only signal the halting head gets, and Adam
    turns even a tiny weight into full-size steps: halting collapses to one step within ~10 updates
    (measured on micro) and later partitions never train. The model assembles its own loss
    (`lm_loss + loop_ponder_weight · ponder_loss`, DESIGN.md §2); during a warm-up step its ponder
    weight is 0, so the loss is the model's LM loss, which the Trainer scales like any loss. The
    weight is back before the optimizer steps: checkpoints, logs and evaluation see the configured one.
    """

    def __init__(self, ratio: float):
        self.ratio = ratio
        self._weight: float | None = None  # the configured weight, while a warm-up step runs

    def in_warmup(self, state) -> bool:
        return self.ratio > 0 and state.global_step < self.ratio * state.max_steps

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.in_warmup(state):
            self._weight = model.config.loop_ponder_weight
            model.config.loop_ponder_weight = 0.0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._restore(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._restore(model)

    def _restore(self, model) -> None:
        if self._weight is not None:
            model.config.loop_ponder_weight = self._weight
            self._weight = None


class ReasoningMetricsCallback(TrainerCallback, LossObserver):
    """What DPSN-R adds to the training logs, accumulated over each logging window.

    Training: `lm_loss`, `ponder_loss`, `avg_steps` (mean reasoning steps over real tokens) and, per
    partition, `pool_<name>_read_pct` and `pool_<name>_kl_uniform` (% of rows read and KL of the read
    counts to uniform; Lample et al. 2019 report the same two numbers). Evaluation:
    `<prefix>_lm_loss` (token-weighted mean NLL), `<prefix>_perplexity` and `<prefix>_avg_steps`,
    from the LM loss only, never the ponder term. DPSNRTrainer.log adds `window_logs(logs)` to
    what the Trainer logs.
    """

    def __init__(self, log_pool_usage: bool = True):
        self.log_pool_usage = log_pool_usage
        self._usage = None  # partition → {"counts", "mass"}, accumulated over the logging window
        self._tracker = None  # the pool's usage tracking while a training step runs
        self._reset_window()
        self._reset_eval()

    def _reset_window(self) -> None:
        self._window = {"lm": 0.0, "ponder": 0.0, "steps": 0.0, "n": 0}

    def _reset_eval(self) -> None:
        self._eval = {"lm": 0.0, "steps": 0.0, "tokens": 0}

    # Usage is counted over the training forwards only: tracking is on from step begin to step end.
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.log_pool_usage:
            self._tracker = model.pool.track_usage(self._usage)
            self._usage = self._tracker.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None

    def on_loss(self, args, state, *, model, inputs, outputs, loss, num_items_in_batch) -> None:
        mask = inputs.get("attention_mask")
        steps = outputs.reasoning_steps.float()
        mean_steps = (steps * mask).sum() / mask.sum().clamp(min=1) if mask is not None else steps.mean()
        if model.training:
            w = self._window
            if outputs.lm_loss is not None:
                w["lm"] += outputs.lm_loss.detach().float().item()
                w["ponder"] += outputs.ponder_loss.detach().float().item()
            w["steps"] += mean_steps.item()
            w["n"] += 1
        elif outputs.lm_loss is not None:
            # token-weighted, so eval_lm_loss is the mean NLL per predicted token
            n_tok = int((inputs["labels"][:, 1:] != -100).sum())
            lm = outputs.lm_loss.detach().float().item()
            if num_items_in_batch is not None:  # loss already summed over tokens / num_items
                lm = lm * float(num_items_in_batch) / max(n_tok, 1)
            self._eval["lm"] += lm * n_tok
            self._eval["steps"] += mean_steps.item() * n_tok
            self._eval["tokens"] += n_tok

    def window_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """The DPSN-R figures that go with `logs` (a training or an evaluation log); resets the window."""
        extra = {}
        if "loss" in logs and self._window["n"]:
            w = self._window
            extra["lm_loss"] = round(w["lm"] / w["n"], 4)
            extra["ponder_loss"] = round(w["ponder"] / w["n"], 4)
            extra["avg_steps"] = round(w["steps"] / w["n"], 3)
            if self._usage is not None:
                extra.update(pool_usage_logs(self._usage))
                for stats in self._usage.values():
                    stats["counts"].zero_()
                    stats["mass"].zero_()
            self._reset_window()
        if any(k.startswith("eval_") for k in logs) and self._eval["tokens"]:
            e = self._eval
            prefix = next(k for k in logs if k.startswith("eval_")).split("_")[0]
            lm = e["lm"] / e["tokens"]
            extra[f"{prefix}_lm_loss"] = round(lm, 4)
            extra[f"{prefix}_perplexity"] = round(math.exp(min(lm, 50.0)), 3)
            extra[f"{prefix}_avg_steps"] = round(e["steps"] / e["tokens"], 3)
            self._reset_eval()
        return extra


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


class NonFiniteLossCallback(TrainerCallback, LossObserver):
    """Stops the run before the optimizer step of a step whose training loss is not finite.

    The optimizer never applies the bad gradients and no checkpoint is written after them, so the
    last checkpoint stays good; the error names it.
    """

    def __init__(self):
        self._bad: float | None = None

    def on_loss(self, args, state, *, model, inputs, outputs, loss, num_items_in_batch) -> None:
        if model.training and self._bad is None and not bool(torch.isfinite(loss).all()):
            self._bad = loss.detach().float().item() if loss.numel() == 1 else float("nan")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._bad is None:
            return
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        raise FloatingPointError(
            f"Non-finite training loss ({self._bad}) at step {state.global_step + 1}; stopping before the "
            f"optimizer step. The last good checkpoint is {last or 'none (no checkpoint saved yet)'}. Lower the "
            "learning rate(s), enable gradient clipping, or check the data."
        )
