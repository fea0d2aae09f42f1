"""What DPSN-R's forward and generate return beyond transformers' usual outputs.

The reasoning loop's per-token statistics (steps, halting probabilities, ponder cost, active parameters)
travel in explicit output dataclasses, and the ponder loss beside the LM loss, as Mixtral's router
statistics and auxiliary loss do (`MoeCausalLMOutputWithPast`). `ReasoningStatsCollector` gathers the
statistics of every token `generate` produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


# The KV cache field is inherited from transformers' classes: `cache` or `past_key_values` by release (cache.py).
@dataclass
class DPSNRModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the reasoning loop's per-token statistics."""

    reasoning_steps: torch.LongTensor | None = None  # (B, T)
    halting_probs: torch.FloatTensor | None = None  # (B, T, loop_max_steps)
    ponder_cost: torch.FloatTensor | None = None  # (B, T)
    active_params: torch.LongTensor | None = None  # (B, T)
    # loop_halting="exits" in training: the final-norm output of the coda on each step's state,
    # S × (B, T, d), the last one `last_hidden_state` (the exits the loss trains); None for an earlier
    # exit this forward did not draw (execution.exit_samples)
    exit_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DPSNRCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the loop's statistics. `loss = lm_loss + loop_ponder_weight ·
    ponder_loss` when labels are given; both parts are also returned on their own (as Mixtral
    returns its router loss)."""

    lm_loss: torch.FloatTensor | None = None
    ponder_loss: torch.FloatTensor | None = None
    reasoning_steps: torch.LongTensor | None = None
    halting_probs: torch.FloatTensor | None = None
    active_params: torch.LongTensor | None = None


class ReasoningStatsCollector:
    """Collects per-token loop statistics while `generate` runs.

    Each decoding forward produces the logits of one new token; the loop that ran on its last
    input position is what "reasoned" that token, so its steps are attributed to it. With beam
    search the rows are beam slots at each step (not back-tracked along the final beams). The
    tensors stay on the model's device (no host copy per decoding step), as the generated ids do.
    """

    def __init__(self, rows_read: Callable[[torch.Tensor], torch.Tensor]):
        self.rows_read = rows_read  # steps (B, n) → pool rows read (DPSNRModel.rows_read)
        self.prompt_steps: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.active: list[torch.Tensor] = []

    def record(self, steps: torch.Tensor, active: torch.Tensor) -> None:
        if self.prompt_steps is None:
            self.prompt_steps = steps.detach()
        self.steps.append(steps[:, -1].detach())
        self.active.append(active[:, -1].detach())

    def summary(self) -> dict:
        if not self.steps:
            return {"steps": torch.zeros(0, 0, dtype=torch.long), "active_params": torch.zeros(0, 0, dtype=torch.long),
                    "rows_read": torch.zeros(0, 0, dtype=torch.long), "prompt_steps": None,
                    "avg_loops": float("nan"), "avg_active_params": float("nan")}
        steps = torch.stack(self.steps, dim=1)  # (B, new_tokens)
        active = torch.stack(self.active, dim=1)
        return {
            "steps": steps,
            "active_params": active,
            "rows_read": self.rows_read(steps),
            "prompt_steps": self.prompt_steps,
            "avg_loops": steps.float().mean().item(),
            "avg_active_params": active.double().mean().item(),
        }


__all__ = ["DPSNRCausalLMOutputWithPast", "DPSNRModelOutputWithPast", "ReasoningStatsCollector"]
