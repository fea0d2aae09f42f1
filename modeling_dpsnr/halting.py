"""Halting policies: how many reasoning steps each token runs, and what its output state is.

A policy is asked once per step, for the rows being processed (the still-running tokens in the
eager driver, every token in the static one), and answers with a `Decision`: which rows halt
now, how much this step's state weighs in the token's output, what to report as the halting
probability, and the cost the policy adds to the loss. Both drivers in `reasoning.py` call the
same `decide`, so eager and static share one arithmetic; per-row state that a policy carries
between steps (ACT's cumulative probability, a router's scale) lives in a dict of (m,) tensors
that the drivers compact or mask along with the rows.

    registry POLICIES (config `loop_halting`):
      "act"        Graves (2016) adaptive computation time: halt once Σ p_s ≥ 1 − ε; output Σ α_s h_s;
                   ponder cost N + R
      "fixed"      every token runs loop_max_steps; output h_S  ("none", its old name, still loads)
      "threshold"  routed capacity (Mixture-of-Depths / Mixture-of-Recursions, Raposo et al. 2024,
                   Bae et al. 2025) with a causal threshold instead of a top-k over the sequence
                   (expert-threshold routing): after step s a router scores each token; it continues
                   when its score beats the quantile that lets a fraction c_{s+1}/c_s of step s's
                   tokens through (`loop_capacity`): the batch's own quantile in training, τ_s, an
                   EMA of those quantiles, at inference (a per-token, causal test). Output h_N. The next
                   step's update is multiplied by σ(g − τ)/sg[σ(g − τ)] — 1 in the forward, so the
                   router never changes what a token computes, while its gradient is the
                   alignment of the update with the loss gradient: "did this step help?"
      "exits"      trained exits (Ouro, Zhu et al. 2025): after step s an exit head gives λ_s, so the
                   token's exit distribution is p_s = λ_s Π_{j<s}(1 − λ_j) (the last step takes the
                   rest). Training runs every step and the model's loss is Σ_s p_s·CE_s − β·H(p) over
                   the exits' LM losses (`trains_exits`: the loop hands every step's state on); at
                   inference a token stops at the first step where Σ_{j≤s} p_j ≥ q. Output h_N.
                   A second stage (execution `exit_objective="gate"`) trains only the exit head, on
                   whether each next step lowered the token's loss (`gate_loss`).

Shapes: m rows being processed, d hidden size.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_dpsnr import DPSNRConfig


@dataclass
class Decision:
    halts: torch.Tensor  # (m,) bool: the token's last step is this one
    weight: torch.Tensor | None  # (m,) float32: weight of this step's state in the token's output;
    #                              None: the output is the state of the halting step (weight 1 there, 0 before)
    prob: torch.Tensor  # (m,) float32: the halting probability reported in `halting_probs`
    cost: torch.Tensor | None  # (m,) float32: the policy's per-token loss term, counted where `halts`


class HaltingPolicy(nn.Module):
    """Base class. `decide` must be pure per row (causal: a token's decision reads only its own
    state), and give the same numbers for a row whether it is processed alone or with others."""

    has_loss = False  # whether `cost` is a loss term (reported as `ponder_loss`)
    halts_early = True  # whether a token may halt before loop_max_steps; False: every token halts at the
    #                     last step, so the eager driver needs neither decisions nor a host sync per step
    trains_exits = False  # whether training needs every step's state (the model's loss weighs the exits)

    def __init__(self, config: DPSNRConfig):
        super().__init__()
        self.max_steps = config.loop_max_steps
        self.min_steps = config.loop_min_steps

    def start(self, rows: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row state before the first step."""
        return {}

    def scale_update(self, s: int, h_prev: torch.Tensor, h_new: torch.Tensor, state: dict) -> torch.Tensor:
        """The state step s hands on; policies that route may scale the update here."""
        return h_new

    def decide(self, s: int, h_new: torch.Tensor, state: dict, valid: torch.Tensor | None = None) -> tuple[Decision, dict]:
        """Rows' decision after step s (0-based) and their state for step s + 1. `valid` (m,) marks
        the rows whose statistics may update running buffers (static driver: the running rows)."""
        raise NotImplementedError

    def _last(self, s: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full(like.shape[:1], s == self.max_steps - 1, dtype=torch.bool, device=like.device)


class ACTHalting(HaltingPolicy):
    has_loss = True

    def __init__(self, config: DPSNRConfig):
        super().__init__(config)
        self.threshold = 1.0 - config.loop_halt_epsilon
        self.halt = nn.Linear(config.hidden_size, 1)
        self.halt.is_halting_head = True  # _init_weights gives it loop_halt_bias_init

    def start(self, rows, ref):
        return {"cum": ref.new_zeros(rows, dtype=torch.float32)}  # c_{s-1}

    def decide(self, s, h_new, state, valid=None):
        cum = state["cum"]
        if s + 1 >= self.min_steps:
            p = torch.sigmoid(self.halt(h_new).squeeze(-1).float())  # (m,)
        else:  # the halting head is not consulted before the floor
            p = torch.zeros_like(cum)
        halts = (cum + p >= self.threshold) | self._last(s, p)
        weight = torch.where(halts, 1.0 - cum, p)  # α_N = R = 1 − c_{N−1}, α_s = p_s before
        cost = (s + 1) + (1.0 - cum)  # ρ = N + R, differentiable through R
        return Decision(halts, weight, p, cost), {"cum": cum + p}


class FixedSteps(HaltingPolicy):
    halts_early = False

    def decide(self, s, h_new, state, valid=None):
        halts = self._last(s, h_new)
        zeros = h_new.new_zeros(h_new.shape[0], dtype=torch.float32)
        return Decision(halts, None, zeros, None), state


class ThresholdRouting(HaltingPolicy):
    def __init__(self, config: DPSNRConfig):
        super().__init__(config)
        self.capacity = list(config.loop_capacity)  # share of tokens reaching each step (static driver's bound)
        capacity = torch.tensor(config.loop_capacity, dtype=torch.float32)  # (S,) share of tokens reaching step s
        # P(continue into step s+1 | ran step s), for s = 0 .. S-2
        self.register_buffer("pass_rate", capacity[1:] / capacity[:-1], persistent=False)
        self.momentum = config.loop_threshold_momentum
        self.norm = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=config.rms_norm_eps)
        # One score per decision; no bias: a shared shift of every score carries no routing information.
        self.router = nn.Linear(config.hidden_size, max(1, self.max_steps - 1), bias=False)
        self.register_buffer("thresholds", torch.zeros(max(1, self.max_steps - 1)))  # τ_s
        self.register_buffer("calibrated", torch.zeros(max(1, self.max_steps - 1), dtype=torch.bool))

    def start(self, rows, ref):
        return {"scale": ref.new_ones(rows, dtype=torch.float32)}

    def scale_update(self, s, h_prev, h_new, state):
        scale = state["scale"].to(h_new.dtype).unsqueeze(-1)  # (m, 1), 1 in the forward
        return h_prev + scale * (h_new - h_prev)

    def decide(self, s, h_new, state, valid=None):
        last = self._last(s, h_new)
        if s == self.max_steps - 1:
            zeros = h_new.new_zeros(h_new.shape[0], dtype=torch.float32)
            return Decision(last, None, zeros + 1.0, None), state
        g = self.router(self.norm(h_new))[:, s].float()  # (m,) score for continuing into step s + 1
        if self.training:
            # Training routes at this batch's own quantile (exact capacity, as Mixture-of-Depths'
            # top-k, without its lag); inference at the EMA of those quantiles, a per-token test.
            threshold = self._calibrate(s, g.detach(), valid)
        else:
            threshold = self.thresholds[s]
        margin = g - threshold
        forced = s + 1 < self.min_steps
        halts = torch.zeros_like(last) if forced else margin <= 0
        gate = torch.sigmoid(margin)
        scale = gate / gate.detach()  # 1 in the forward; the router's gradient path
        return Decision(halts, None, 1.0 - gate.detach(), None), {"scale": scale}

    @torch.no_grad()
    def _calibrate(self, s: int, g: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The score quantile that passes `pass_rate[s]` of the rows deciding here (linear
        interpolation); folds it into the EMA τ_s and returns it. Sort-based with masked rows at
        +inf, so it needs no boolean indexing (no host sync)."""
        count = g.new_tensor(g.shape[0]) if valid is None else valid.sum().float()
        if valid is not None:
            g = torch.where(valid, g, torch.full_like(g, float("inf")))
        ranked = g.sort().values  # valid rows first
        pos = ((1.0 - self.pass_rate[s]) * (count - 1)).clamp(min=0)  # fractional rank of the quantile
        lo = pos.floor().long().clamp(max=max(g.shape[0] - 1, 0))
        hi = (lo + 1).clamp(max=(count.long() - 1).clamp(min=0))
        frac = pos - pos.floor()
        q = (ranked.gather(0, lo.view(1)) * (1 - frac) + ranked.gather(0, hi.view(1)) * frac).squeeze(0)
        has_rows = count > 0
        q = torch.where(has_rows, q, self.thresholds[s])
        momentum = torch.where(self.calibrated[s], torch.tensor(self.momentum, device=g.device), torch.ones((), device=g.device))
        self.thresholds[s] = self.thresholds[s] + momentum * (q - self.thresholds[s])
        self.calibrated[s] = self.calibrated[s] | has_rows
        return q


# The second stage's label: continue while the next step lowers the loss by more than GATE_MARGIN nats,
# softened with sharpness GATE_SHARPNESS (the form of Ouro's adaptive-gate training; values of that order).
GATE_MARGIN = 0.005
GATE_SHARPNESS = 50.0


class TrainedExits(HaltingPolicy):
    """Every step is an exit. `Decision.prob` is the exit probability p_s (with its gradient), so
    the loop's `halting_probs` is the exit distribution the model's loss weighs the exits with."""

    trains_exits = True

    def __init__(self, config: DPSNRConfig):
        super().__init__(config)
        self.threshold = config.loop_exit_threshold  # q: a token stops once its exit CDF reaches it
        self.norm = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=config.rms_norm_eps)
        self.exit = nn.Linear(config.hidden_size, max(1, self.max_steps - 1))  # one score per step but the last
        self.exit.is_exit_head = True  # _init_weights: a uniform exit distribution at the start

    def start(self, rows, ref):
        return {"survive": ref.new_ones(rows, dtype=torch.float32)}  # Π_{j<s}(1 − λ_j)

    def decide(self, s, h_new, state, valid=None):
        survive = state["survive"]
        last = self._last(s, h_new)
        if s == self.max_steps - 1:
            lam = torch.ones_like(survive)
        elif s + 1 < self.min_steps:  # no exit before the floor
            lam = torch.zeros_like(survive)
        else:
            lam = torch.sigmoid(self.exit(self.norm(h_new))[:, s].float())  # (m,)
        prob = survive * lam  # p_s
        survive = survive * (1.0 - lam)
        # CDF_s = 1 − Π_{j≤s}(1 − λ_j) ≥ q; training runs every step (each is an exit the loss trains).
        halts = last if self.training else last | (survive <= 1.0 - self.threshold)
        return Decision(halts, None, prob, None), {"survive": survive}

    @staticmethod
    def gate_loss(probs: torch.Tensor, ce: torch.Tensor, min_steps: int = 1) -> torch.Tensor:
        """Ouro's second stage, per token (...,): the exit decisions fitted to whether the next step
        helps. probs (..., S) the exit distribution; ce (..., S) each exit's next-token loss (no
        gradient). After step s the target probability of continuing is σ(k·(ce_s − ce_{s+1} − γ)),
        k = GATE_SHARPNESS, γ = GATE_MARGIN nats; the decision's binary cross-entropy is weighted by
        the chance it is reached, Π_{j<s}(1 − λ_j), so decisions no token gets to do not count."""
        survive = 1.0 - probs.cumsum(-1) + probs  # (..., S) Π_{j<s}(1 − λ_j) = 1 − Σ_{j<s} p_j
        lam = (probs / survive.clamp_min(1e-6))[..., :-1].clamp(1e-6, 1.0 - 1e-6)  # (..., S-1) λ_s
        gain = ce[..., :-1] - ce[..., 1:]
        cont = torch.sigmoid(GATE_SHARPNESS * (gain - GATE_MARGIN))
        bce = -(cont * torch.log1p(-lam) + (1.0 - cont) * torch.log(lam))
        weight = survive[..., :-1].detach().clone()
        weight[..., : max(0, min_steps - 1)] = 0.0  # forced decisions before the floor
        return (weight * bce).sum(-1)

    @staticmethod
    def init_bias(steps: int) -> list[float]:
        """Exit-head biases giving a uniform exit distribution over `steps` steps: λ_s = 1/(S − s)."""
        return [math.log(1.0 / (steps - s - 1)) for s in range(max(1, steps - 1))] if steps > 1 else [0.0]


POLICIES: dict[str, type[HaltingPolicy]] = {
    "act": ACTHalting,
    "fixed": FixedSteps,
    "threshold": ThresholdRouting,
    "exits": TrainedExits,
}
LEGACY_POLICY_NAMES = {"none": "fixed"}


def build_policy(config: DPSNRConfig) -> HaltingPolicy:
    return POLICIES[config.loop_halting](config)


__all__ = ["Decision", "HaltingPolicy", "ACTHalting", "FixedSteps", "ThresholdRouting", "TrainedExits", "POLICIES",
           "build_policy"]
