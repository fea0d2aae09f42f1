"""The adaptive reasoning loop: per token, read the pool a few times and halt when confident.

    h_0 ── for s = 1 .. S (S = loop_max_steps) ──────────────────────────────────────────
            x   = norm(h_{s-1})
            r   = pool[schedule[s]](x + e + step_embedding[s], x)   retrieval + weighted read
                  (e = norm(token embedding) with pool_query_input="state+token", else 0)
            h_s = h_{s-1} + σ(W_g·x) ⊙ r                            gated integration
            p_s = σ(w_halt·h_s + b_halt)                            halting probability
            halt once c_s = Σ_{j≤s} p_j ≥ 1 − ε, or at s = S
         ──────────────────────────────────────────────────────────────────────────────────
    h* = Σ_s α_s·h_s,  α_s = p_s (s < N),  α_N = R = 1 − c_{N−1};   ponder cost ρ = N + R

ACT as in Graves (2016), "Adaptive Computation Time for Recurrent Neural Networks". The loop
has no attention, so each token's loop reads only its own state and needs no cache.

Two execution modes give the same numbers (a test says so):
- eager: each step gathers the still-running tokens, runs them, and emits the halted ones, so a
  token that halts after 2 steps pays for 2 retrievals, in prefill, decoding and training;
- static: every token runs every step and masks decide what counts (XLA, torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_dpsnr import DPSNRConfig
from .pool import ParameterPool


@dataclass
class LoopOutput:
    hidden_states: torch.Tensor  # (B, T, d)  h*
    steps: torch.Tensor  # (B, T) int64, N per token (0 for padding skipped in eager mode)
    halting_probs: torch.Tensor  # (B, T, S) p_s, 0 after halting
    ponder_cost: torch.Tensor  # (B, T)  ρ = N + R (differentiable through R)


class ReasoningLoop(nn.Module):
    def __init__(self, config: DPSNRConfig, norm_cls: type[nn.Module]):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.max_steps = config.loop_max_steps
        self.min_steps = config.loop_min_steps
        self.schedule = list(config.loop_phase_schedule)
        self.use_act = config.loop_halting == "act"
        self.threshold = 1.0 - config.loop_halt_epsilon
        self.norm = norm_cls(d, eps=config.rms_norm_eps)
        self.step_embedding = nn.Parameter(torch.zeros(self.max_steps, d))  # (S, d)
        # The token's own embedding keeps queries token-specific while the contextual state is
        # still collapsed (early training); see `pool_query_input` in the config.
        self.token_norm = norm_cls(d, eps=config.rms_norm_eps) if config.pool_query_input == "state+token" else None
        self.gate = nn.Linear(d, d)
        self.halt = nn.Linear(d, 1)
        self.halt.is_halting_head = True  # _init_weights gives it the halting bias
        self.pool = ParameterPool(config)

    # ------------------------------------------------------------------ one step
    def step(self, h: torch.Tensor, s: int, static: bool, token_mask: torch.Tensor | None = None,
             token: torch.Tensor | None = None):
        """(n, d) state → (n, d) new state, (n,) halting probability. `token`: (n, d) normed embeddings."""
        x = self.norm(h)
        query_input = x + self.step_embedding[s] if token is None else x + token + self.step_embedding[s]
        r = self.pool(self.schedule[s], query_input, x, static=static, token_mask=token_mask)
        h_new = h + torch.sigmoid(self.gate(x)) * r
        if self.use_act and s + 1 >= self.min_steps:
            p = torch.sigmoid(self.halt(h_new).squeeze(-1).float())
        else:  # the halting head is not consulted before the floor (or at all without ACT)
            p = h_new.new_zeros(h_new.shape[0], dtype=torch.float32)
        return h_new, p

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        static: bool,
        token_embeddings: torch.Tensor | None = None,
    ) -> LoopOutput:
        """hidden_states, token_embeddings (B, T, d); token_mask (B, T) bool, False for padding (or None)."""
        B, T, d = hidden_states.shape
        h = hidden_states.reshape(B * T, d)
        mask = None if token_mask is None else token_mask.reshape(B * T)
        token = None
        if self.token_norm is not None:
            if token_embeddings is None:
                raise ValueError("pool_query_input='state+token' needs the token embeddings of the input.")
            token = self.token_norm(token_embeddings.reshape(B * T, d))  # (B·T, d)
        if static:
            out = self._static(h, mask, token)
        else:
            out = self._eager(h, mask, token)
        hidden, steps, probs, ponder = out
        return LoopOutput(
            hidden_states=hidden.view(B, T, d),
            steps=steps.view(B, T),
            halting_probs=probs.view(B, T, self.max_steps),
            ponder_cost=ponder.view(B, T),
        )

    # ------------------------------------------------------------------ eager: running tokens only
    def _eager(self, h0: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor | None):
        n, d = h0.shape
        S = self.max_steps
        device = h0.device
        running = torch.arange(n, device=device) if mask is None else mask.nonzero().squeeze(-1)  # (m,)
        h = h0[running]  # (m, d) state of running tokens
        tok = None if token is None else token[running]  # (m, d)
        acc = torch.zeros_like(h)  # (m, d) Σ α_s h_s so far
        cum = h.new_zeros(h.shape[0], dtype=torch.float32)  # (m,) c_{s-1}
        done_idx, done_acc, done_ponder, done_steps = [], [], [], []
        prob_idx, prob_step, prob_val = [], [], []
        for s in range(S):
            if running.numel() == 0:
                break
            h_new, p = self.step(h, s, static=False, token=tok)
            halts = (cum + p >= self.threshold) if s < S - 1 else torch.ones_like(p, dtype=torch.bool)
            alpha = torch.where(halts, 1.0 - cum, p)  # (m,)
            acc = acc + alpha.unsqueeze(-1).to(h_new.dtype) * h_new
            prob_idx.append(running)
            prob_step.append(torch.full_like(running, s))
            prob_val.append(p)
            if halts.any():
                done_idx.append(running[halts])
                done_acc.append(acc[halts])
                done_ponder.append((s + 1) + (1.0 - cum[halts]))
                done_steps.append(torch.full_like(running[halts], s + 1))
            keep = ~halts
            running, h, acc, cum = running[keep], h_new[keep], acc[keep], (cum + p)[keep]
            tok = None if tok is None else tok[keep]

        hidden = h0 if mask is not None else h0.new_zeros(n, d)  # padding keeps its state (index_copy is out of place)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        ponder = torch.zeros(n, dtype=torch.float32, device=device)
        probs = torch.zeros(n, S, dtype=torch.float32, device=device)
        if done_idx:
            idx = torch.cat(done_idx)
            hidden = hidden.index_copy(0, idx, torch.cat(done_acc))
            ponder = ponder.index_copy(0, idx, torch.cat(done_ponder))
            steps = steps.index_copy(0, idx, torch.cat(done_steps))
            probs = probs.index_put((torch.cat(prob_idx), torch.cat(prob_step)), torch.cat(prob_val))
        return hidden, steps, probs, ponder

    # ------------------------------------------------------------------ static: all tokens, masks
    def _static(self, h0: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor | None):
        n, d = h0.shape
        S = self.max_steps
        running = torch.ones(n, dtype=torch.bool, device=h0.device) if mask is None else mask.clone()
        h = h0
        acc = torch.zeros_like(h0)
        cum = h0.new_zeros(n, dtype=torch.float32)
        steps = torch.zeros(n, dtype=torch.long, device=h0.device)
        ponder = h0.new_zeros(n, dtype=torch.float32)
        probs = []
        for s in range(S):
            h_new, p = self.step(h, s, static=True, token_mask=running, token=token)
            p = torch.where(running, p, torch.zeros_like(p))
            last = s == S - 1
            halts = running & ((cum + p >= self.threshold) | last)
            alpha = torch.where(halts, 1.0 - cum, p)  # 0 for tokens already halted (p masked)
            acc = acc + alpha.unsqueeze(-1).to(h_new.dtype) * h_new
            ponder = torch.where(halts, (s + 1) + (1.0 - cum), ponder)
            steps = steps + running.long()
            probs.append(p)
            cum = torch.where(running & ~halts, cum + p, cum)
            h = torch.where(running.unsqueeze(-1), h_new, h)
            running = running & ~halts
        hidden = acc if mask is None else torch.where(mask.unsqueeze(-1), acc, h0)
        return hidden, steps, torch.stack(probs, dim=-1), ponder

    # ------------------------------------------------------------------ cost model
    def parameters_per_step(self) -> int:
        """Pool parameters read per token per step: heads × reads per head × parameters per entry."""
        c = self.config
        return c.pool_heads * c.pool_reads_per_head * c.pool_entry_params
