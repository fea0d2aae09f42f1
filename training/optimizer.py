"""DPSNRTrainer's optimizer: AdamW for the controller, a lazy row-wise Adam for the pool, one face.

    parameters ── controller (dense grads) ──▶ AdamW: weight decay on matrices, none on norms/biases
               └─ pool entry tables (sparse) ─▶ SparseRowAdam: own lr, own clipping, no weight decay
    both behind ChainedOptimizer, so the Trainer's LR scheduler, accelerate and checkpointing see one

Sparse tensors do not exist on XLA: there the pool keeps its own learning rate and no weight decay
but takes dense gradients in an extra AdamW group, clipped with the controller.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .pool_optim import SparseRowAdam, clip_grad_norm_, coalesced


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


def build_optimizer(model: nn.Module, args, decay_names: set[str], pool_param_ids: set[int],
                    sparse_grads: bool) -> torch.optim.Optimizer:
    """AdamW on the controller (+ the pool as a dense group without sparse gradients), chained with
    SparseRowAdam on the pool when its gradients are sparse. `args`: DPSNRTrainingArguments."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dense = [(n, p) for n, p in named if id(p) not in pool_param_ids]
    pool = [p for n, p in named if id(p) in pool_param_ids]
    groups = [
        {"params": [p for n, p in dense if n in decay_names], "weight_decay": args.weight_decay},
        {"params": [p for n, p in dense if n not in decay_names], "weight_decay": 0.0},
    ]
    if not sparse_grads:  # XLA: the pool as a dense group with its own learning rate
        groups.append({"params": pool, "weight_decay": 0.0, "lr": args.pool_learning_rate})
    groups = [g for g in groups if g["params"]]  # frozen parts (e.g. the exit-gate stage) leave groups empty
    adamw = torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    if not sparse_grads or not pool:
        return adamw
    pool_opt = SparseRowAdam(
        pool, lr=args.pool_learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        rowwise_second_moment=args.pool_rowwise_second_moment, max_grad_norm=args.pool_max_grad_norm,
    )
    return ChainedOptimizer([adamw, pool_opt])


def clip_controller_grad_norm(model: nn.Module, pool_param_ids: set[int], max_norm: float | None) -> torch.Tensor:
    """Clip the controller's dense gradients to `max_norm`; the pool optimizer clips the sparse ones
    itself. Returns the norm over all gradients (dense and sparse) before clipping, for logging."""
    params = [p for p in model.parameters() if p.grad is not None]
    dense = [p for p in params if id(p) not in pool_param_ids]
    sparse = [p for p in params if id(p) in pool_param_ids]
    if max_norm and max_norm > 0:
        dense_norm = clip_grad_norm_(dense, max_norm).float()
    else:
        dense_norm = torch.sqrt(sum((p.grad.float().pow(2).sum() for p in dense), torch.zeros(())))
    pool_sq = torch.zeros(())
    for p in sparse:
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)  # once here; SparseRowAdam skips its own dedup for coalesced grads
            pool_sq = pool_sq + p.grad.values().float().pow(2).sum()
        else:
            pool_sq = pool_sq + p.grad.float().pow(2).sum()
    return torch.sqrt(dense_norm**2 + pool_sq)
