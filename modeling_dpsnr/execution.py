"""How a DPSN-R model runs, kept apart from what it is.

The config (`DPSNRConfig`) describes the architecture and is what `save_pretrained` writes. How a
run executes — the eager or static loop driver, sparse or dense pool gradients, a replacement for
the plain row read when the tables are sharded — depends on the trainer, the device and the
launcher, so it is an `ExecutionPlan` set on the model with `model.set_execution(...)` and never
saved: a folder trained with sparse gradients fine-tunes with a plain `transformers.Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

LOOP_MODES = ("auto", "eager", "static")
EXIT_OBJECTIVES = ("expected", "gate")


@dataclass(frozen=True)
class ExecutionPlan:
    """loop_mode: "eager" runs only the still-running tokens at each step (compute follows the
        halting); "static" runs every token through every step with masks (XLA, torch.compile,
        torch.export); "auto" is static on XLA devices and while compiling or exporting, eager otherwise.
    pool_sparse_grads: the entry tables produce sparse (COO) gradients, for a row-wise optimizer
        (`dpsnr.training.pool_optim.SparseRowAdam`). Off by default so any optimizer works.
    pool_fused_reads: neuron entries read in cache-sized chunks without materialising the gathered
        rows (reads.py; eager driver, tables beside the controller); False: the plain read, its reference.
    pool_row_gather: `f(table, idx) -> table[idx]` replacing the plain row read (row-sharded tables,
        see training/distributed.py); None reads rows with `F.embedding`.
    loop_static_capacity: with a halting policy that routes a known share of tokens into each step
        ("threshold", `loop_capacity`), the static driver gathers ⌈slack · share · rows⌉ rows per step
        instead of running every row masked, so a compiled or XLA loop saves compute too; tokens beyond
        that bound halt where they are (none do while the slack covers the routing). None: every row.
    exit_objective: what a model with trained exits (`loop_halting="exits"`) learns in training.
        "expected" (Ouro's first stage): the expected loss over the exits minus the entropy bonus;
        "gate" (Ouro's second stage): only the exit decisions, each step's exit probability fitted to
        whether the next step lowers the token's loss by more than `GATE_MARGIN` nats (halting.py);
        freeze every other parameter (`DPSNRTrainingArguments.exit_gate_stage` does).
    exit_samples: with trained exits and the "expected" objective, how many of the S − 1 earlier exits
        a training forward runs the coda and LM head on, drawn uniformly without replacement each
        forward (torch's global generator, so seeded runs repeat); the last exit's loss stands in for
        the others and each drawn exit adds its gap to it scaled (S − 1) / exit_samples
        (`DPSNRForCausalLM._sampled_expected_loss`), an unbiased estimate of the expected loss over every
        exit at a fraction of its cost (the last exit is always computed: it is the forward's own output). None: every exit, Ouro's recipe. The gate objective always uses every exit. Measured on
        micro at 716,800 tokens (study row F-exits-s1, m = 1): 4-7 % higher perplexity than every exit
        on both datasets, for ~10 % less training time: every exit stays the recipe.
    """

    loop_mode: str = "auto"
    pool_sparse_grads: bool = False
    pool_fused_reads: bool = True
    pool_row_gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    loop_static_capacity: float | None = None
    exit_objective: str = "expected"
    exit_samples: int | None = None

    def __post_init__(self):
        if self.loop_mode not in LOOP_MODES:
            raise ValueError(f"loop_mode must be one of {list(LOOP_MODES)}, got {self.loop_mode!r}.")
        for name in ("pool_sparse_grads", "pool_fused_reads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.pool_row_gather is not None and not callable(self.pool_row_gather):
            raise ValueError(f"pool_row_gather must be callable or None, got {self.pool_row_gather!r}.")
        if self.exit_objective not in EXIT_OBJECTIVES:
            raise ValueError(f"exit_objective must be one of {list(EXIT_OBJECTIVES)}, got {self.exit_objective!r}.")
        m = self.exit_samples
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"exit_samples must be an int ≥ 1 or None (every exit), got {m!r}.")
        slack = self.loop_static_capacity
        if slack is not None and (isinstance(slack, bool) or not isinstance(slack, (int, float)) or not slack >= 1.0):
            raise ValueError(f"loop_static_capacity must be a slack factor ≥ 1 or None, got {slack!r}.")

    def updated(self, **changes) -> "ExecutionPlan":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown execution setting(s) {unknown}; known: {[f.name for f in fields(self)]}.")
        return replace(self, **changes)

    def static_loop(self, hidden_states: torch.Tensor) -> bool:
        """Whether the loop runs its static (masked, fixed-shape) driver on this input."""
        if self.loop_mode == "auto":
            return hidden_states.device.type == "xla" or is_tracing()
        if self.loop_mode == "eager" and is_exporting():
            # The eager driver's shapes follow the halting (nonzero, boolean indexing), which no single
            # exported graph can hold; say so instead of failing deep inside the tracer.
            raise RuntimeError(
                'loop_mode="eager" cannot be exported: its tensor shapes depend on which tokens halt. '
                'Call model.set_execution(loop_mode="auto") (or "static") before torch.export / torch.onnx.export; '
                "both drivers give the same numbers."
            )
        return self.loop_mode == "static"


def is_tracing() -> bool:
    """True while torch.compile / torch.export (dynamo), torch.jit or torch.fx trace the forward:
    data-dependent input checks and host syncs stay out of such graphs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    from torch.fx import _symbolic_trace

    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or getattr(_symbolic_trace, "is_fx_tracing", None)
    return bool(check and check())


def is_exporting() -> bool:
    """True while torch.export (and the ONNX dynamo exporter, built on it) traces the forward."""
    check = getattr(torch.compiler, "is_exporting", None)  # absent from older torch releases
    return bool(check and check())


class ExecutionMixin:
    """`execution` and `set_execution` for a model that reads a pool (`self.pool`): DPSN-R's models and the
    retrofitted LM. The plan is kept by `_execution_owner()`, the module whose forward reads it (DPSN-R:
    the base model, shared by DPSNRForCausalLM and its DPSNRModel), under `_execution`."""

    def _execution_owner(self):
        return self

    @property
    def execution(self) -> ExecutionPlan:
        """How this model runs (loop driver, sparse pool gradients, row reads); see `set_execution`."""
        return self._execution_owner()._execution

    def set_execution(self, **changes) -> ExecutionPlan:
        """Change how the model runs, never what it is: `loop_mode` ("auto" | "eager" | "static"),
        `pool_sparse_grads` (bool), `pool_fused_reads` (bool), `pool_row_gather` (callable or None),
        `loop_static_capacity` (slack ≥ 1 or None), `exit_objective` ("expected" | "gate"),
        `exit_samples` (int ≥ 1 or None).
        Trainers, launchers and loaders call this; nothing of it is saved by `save_pretrained`.
        Returns the new plan."""
        owner = self._execution_owner()
        owner._execution = owner._execution.updated(**changes)
        self.pool.apply_execution(owner._execution)
        loop = getattr(owner, "loop", None) or getattr(getattr(owner, "memory", None), "loop", None)
        if loop is not None:
            loop.static_capacity = owner._execution.loop_static_capacity
        return owner._execution


# Keys that configs saved before the plan existed carry; they are runtime settings, dropped on load.
LEGACY_CONFIG_KEYS = ("loop_mode", "pool_sparse_grads")

__all__ = ["EXIT_OBJECTIVES", "ExecutionMixin", "ExecutionPlan", "LEGACY_CONFIG_KEYS", "LOOP_MODES", "is_exporting", "is_tracing"]
