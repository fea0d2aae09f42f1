"""The adaptive reasoning loop: per token, read the pool a few times and halt when the policy says.

    h_0 ── for s = 1 .. S (S = loop_max_steps), for the tokens still running ────────────────────
            step kind "token" (config loop_step):       step kind "block":
              x   = norm(h)                               h' = h + attn(norm₁(h))   keys of halted
              h_s = h + σ(W_g·x) ⊙ read_s(x)                     tokens: their last state
                                                          y  = norm₂(h')
                                                          h_s = h' + σ(W_g·y) ⊙ read_s(y)
            read_s(x) = pool[schedule[s]](x + e + step_embedding[s], x)   retrieval + weighted read
                        (e = norm(token embedding) with pool_query_input="state+token", else 0)
            policy (halting.py) decides from h_s which tokens halt, and their output weights
         ───────────────────────────────────────────────────────────────────────────────────────────
    h* = Σ_s w_s·h_s  (ACT: w = α; fixed and threshold: the last state)

The token step reads only the token's own state and the pool, so a token's loop needs no cache.
The block step is a shared transformer block whose MLP is the pool read, iterated (the
recurrent-depth design of Huginn, Ouro and Mixture-of-Recursions): attention at step s sees every
earlier token at step s, or at its deepest state if it halted before s. Its keys are
step-independent functions of that state, so a halted token's keys are computed once more after
it halts and then reused; with a KV cache they live in cache layers num_hidden_layers + s.

Two drivers give the same numbers (tests say so):
- eager: each step gathers the running tokens, runs them and emits the halted ones, so a token
  that halts after 2 steps pays for 2 steps, in prefill, decoding and training;
- static: every token runs every step and masks decide what counts (XLA, torch.compile, export).
The driver is chosen once per forward by the model (`PoolRead.static`, from its ExecutionPlan), and
the same `PoolRead` reaches every pool read through the loop's `LoopContext`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import nn

from .cache import cache_update
from .configuration_dpsnr import DPSNRConfig
from .halting import Decision, HaltingPolicy, build_policy
from .norms import DPSNRRMSNorm
from .pool import ParameterPool
from .reads import EAGER_READ, PoolRead


@dataclass
class LoopOutput:
    hidden_states: torch.Tensor  # (B, T, d)  h*
    steps: torch.Tensor  # (B, T) int64, N per token (0 for padding skipped in eager mode)
    halting_probs: torch.Tensor  # (B, T, S) p_s, 0 after halting
    ponder_cost: torch.Tensor  # (B, T)  the policy's cost (ACT: ρ = N + R), 0 without one
    step_states: list[torch.Tensor] | None = None  # S × (B, T, d): every step's state, when training
    #                                                 a policy whose exits the loss trains (padding: h_0)


@dataclass
class LoopContext:
    """What a step needs beyond its rows, for one forward: how it reads the pool, and for a step that
    attends (the block step) positions, the causal mask and the cache."""

    read: PoolRead  # the read mode of this forward's driver, and rows hashed from the ids
    batch: int = 0
    length: int = 0
    cos: torch.Tensor | None = None  # (B·T, hd)
    sin: torch.Tensor | None = None  # (B·T, hd)
    attention_mask: torch.Tensor | None = None  # as built for the controller's blocks
    cache: object | None = None  # transformers Cache
    cache_layer: int = 0  # cache layer of step 0
    kv: dict | None = None  # per-forward buffers of the block step
    step_states: list | None = None  # each step's (n, d) state, collected when the policy trains exits


# ---------------------------------------------------------------------------- step kinds
class TokenStep(nn.Module):
    """The token-wise step: gated pool read on the token's own normalised state."""

    attends = False  # whether the step attends over the sequence (needs positions, mask, cache in its context)

    def __init__(self, config: DPSNRConfig, pool: ParameterPool, attention_cls=None):
        super().__init__()
        d = config.hidden_size
        self.schedule = list(config.loop_phase_schedule)
        self.norm = DPSNRRMSNorm(d, eps=config.rms_norm_eps)
        self.step_embedding = nn.Parameter(torch.zeros(config.loop_max_steps, d))  # (S, d)
        # The token's own embedding keeps queries token-specific while the contextual state is
        # still collapsed (early training); see `pool_query_input` in the config.
        self.token_norm = DPSNRRMSNorm(d, eps=config.rms_norm_eps) if config.pool_query_input == "state+token" else None
        self.gate = nn.Linear(d, d)
        self.pool = [pool]  # a reference, not a submodule: the loop owns the pool

    def read(self, x, s, rows, token, token_mask, ctx: LoopContext):
        """Gated pool read for the rows' normalised states x (m, d)."""
        query = x + self.step_embedding[s] if token is None else x + token + self.step_embedding[s]
        r = self.pool[0](self.schedule[s], query, x, read=ctx.read, token_mask=token_mask, rows=rows)  # (m, d)
        return torch.sigmoid(self.gate(x)) * r

    def forward(self, h, s, rows, token, token_mask, ctx: LoopContext):
        """h (m, d) → (m, d). rows (m,): the rows' flat indices among the forward's B·T tokens."""
        return h + self.read(self.norm(h), s, rows, token, token_mask, ctx)

    def finish(self, h_full, stale, steps_done, ctx) -> None:
        """Called once the driver stops (the block step fills the remaining cache layers)."""


class BlockStep(TokenStep):
    """A shared pre-norm block, attention + pool read as its MLP, iterated once per step."""

    attends = True

    def __init__(self, config: DPSNRConfig, pool: ParameterPool, attention_cls=None):
        super().__init__(config, pool)
        d = config.hidden_size
        self.attn_norm = DPSNRRMSNorm(d, eps=config.rms_norm_eps)
        self.attn = attention_cls(config, layer_idx=config.num_hidden_layers)
        self.max_steps = config.loop_max_steps

    def forward(self, h, s, rows, token, token_mask, ctx: LoopContext):
        kv = ctx.kv
        B, T = ctx.batch, ctx.length
        x = self.attn_norm(h)  # (m, d)
        # 1. keys / values at depth s: recompute the rows whose state changed since the last step
        #    (running or just halted); halted rows keep theirs (their deepest state). Rows are sorted
        #    and distinct, so m = B·T means every row, in order: no gather or scatter. When the stale
        #    rows are the processed ones (nobody halted since the last step), their normalised state is x.
        every = rows.shape[0] == B * T
        stale = kv["stale"]
        self._refresh_kv(kv, ctx, x if stale is rows or (every and stale.shape[0] == B * T) else None)
        keys, values = kv["k"], kv["v"]  # (B·T, kvH, hd)
        k = keys.view(B, T, *keys.shape[1:]).transpose(1, 2)  # (B, kvH, T, hd)
        v = values.view(B, T, *values.shape[1:]).transpose(1, 2)
        if ctx.cache is not None:
            k, v = cache_update(ctx.cache, k, v, ctx.cache_layer + s)
        # 2. queries of the processed rows only, laid out densely for the attention kernel.
        q_rows = self.attn.queries(x, *((ctx.cos, ctx.sin) if every else (ctx.cos[rows], ctx.sin[rows])))  # (m, H, hd)
        q = q_rows if every else q_rows.new_zeros(B * T, *q_rows.shape[1:]).index_copy(0, rows, q_rows)
        q = q.view(B, T, *q_rows.shape[1:]).transpose(1, 2)  # (B, H, T, hd)
        out, _ = self.attn.attend(q, k, v, ctx.attention_mask)  # (B, T, H·hd)
        out = out.reshape(B * T, -1)
        h = h + self.attn.o_proj(out if every else out[rows])
        # 3. the pool read is the block's MLP
        return h + self.read(self.norm(h), s, rows, token, token_mask, ctx)

    def _refresh_kv(self, kv: dict, ctx: LoopContext, normed: torch.Tensor | None = None) -> None:
        """normed: attn_norm of the stale rows' state, when the caller has it."""
        stale = kv["stale"]  # (r,) flat rows whose state changed
        if stale.numel() == 0 and kv["k"] is not None:
            return
        every = stale.shape[0] == kv["state"].shape[0]  # every row, in order (stale rows are sorted, distinct)
        x = normed if normed is not None else self.attn_norm(kv["state"] if every else kv["state"][stale])
        k_new, v_new = self.attn.keys_values(x, *((ctx.cos, ctx.sin) if every else (ctx.cos[stale], ctx.sin[stale])))  # (r, kvH, hd)
        if kv["k"] is None or every:
            kv["k"], kv["v"] = k_new, v_new  # e.g. the first step: every row is stale
        else:
            kv["k"] = kv["k"].index_copy(0, stale, k_new)
            kv["v"] = kv["v"].index_copy(0, stale, v_new)
        kv["stale"] = stale[:0]

    def finish(self, h_full, stale, steps_done, ctx: LoopContext) -> None:
        """With a cache, steps the batch did not run still need every token's keys at that depth:
        its deepest state's, computed once."""
        if ctx.cache is None or steps_done >= self.max_steps:
            return
        kv = ctx.kv
        kv["state"], kv["stale"] = h_full, stale
        self._refresh_kv(kv, ctx)
        B, T = ctx.batch, ctx.length
        k = kv["k"].view(B, T, *kv["k"].shape[1:]).transpose(1, 2)
        v = kv["v"].view(B, T, *kv["v"].shape[1:]).transpose(1, 2)
        for s in range(steps_done, self.max_steps):
            cache_update(ctx.cache, k, v, ctx.cache_layer + s)


STEP_KINDS: dict[str, type[TokenStep]] = {"token": TokenStep, "block": BlockStep}


# ---------------------------------------------------------------------------- what the model hands the loop
def loop_token_mask(attention_mask: torch.Tensor | None, length: int, static: bool) -> torch.Tensor | None:
    """(B, T) bool of the tokens the loop runs (False: padding, whose attention mask is 0), or None when
    every token runs. Padding skips the loop in the eager driver and is masked in the static one; whether
    every token runs is a host sync, so only the eager driver (which syncs anyway) asks."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    token_mask = attention_mask[:, -length:].bool()
    if not static and bool(token_mask.all()):
        return None
    return token_mask


def ponder_loss(ponder_cost: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Mean ponder cost over the tokens whose next-token prediction is scored.

    Those are exactly the tokens the LM loss averages over (position t predicts labels[t+1]),
    so under gradient accumulation the same `num_items_in_batch` normalises both terms.
    """
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    total = (ponder_cost * scored).sum()
    if num_items_in_batch is not None:
        denom = num_items_in_batch
        if torch.is_tensor(denom):
            denom = denom.to(total.device)
        return total / denom
    return total / scored.sum().clamp(min=1)


# ---------------------------------------------------------------------------- the loop
class ReasoningLoop(nn.Module):
    def __init__(self, config: DPSNRConfig, attention_cls: type[nn.Module] | None = None):
        """`attention_cls`: the controller's attention (modeling_dpsnr.DPSNRAttention), for the block step."""
        super().__init__()
        self.config = config
        self.max_steps = config.loop_max_steps
        self.pool = ParameterPool(config)
        self.step = STEP_KINDS[config.loop_step](config, self.pool, attention_cls)
        self.policy: HaltingPolicy = build_policy(config)
        self.static_capacity: float | None = None  # ExecutionPlan.loop_static_capacity

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        read: PoolRead = EAGER_READ,
        token_embeddings: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> LoopOutput:
        """hidden_states, token_embeddings (B, T, d); token_mask (B, T) bool, False for padding (or
        None); read: how this forward reads the pool (its `static` picks the driver); position_embeddings
        (cos, sin) (B, T, hd), attention_mask and cache: for a step that attends (the block step)."""
        B, T, d = hidden_states.shape
        self.pool.begin_forward()
        h = hidden_states.reshape(B * T, d)
        mask = None if token_mask is None else token_mask.reshape(B * T)
        token = None
        if self.step.token_norm is not None:
            if token_embeddings is None:
                raise ValueError("pool_query_input='state+token' needs the token embeddings of the input.")
            token = self.step.token_norm(token_embeddings.reshape(B * T, d))  # (B·T, d)
        ctx = LoopContext(read)
        if self.step.attends:
            cos, sin = position_embeddings
            cos = cos.expand(B, T, -1).reshape(B * T, -1)
            sin = sin.expand(B, T, -1).reshape(B * T, -1)
            ctx = LoopContext(read, B, T, cos, sin, attention_mask, cache, self.config.num_hidden_layers)
        ctx.step_states = [] if self.training and self.policy.trains_exits else None
        hidden, steps, probs, ponder = (self._static if read.static else self._eager)(h, mask, token, ctx)
        return LoopOutput(
            hidden_states=hidden.view(B, T, d),
            steps=steps.view(B, T),
            halting_probs=probs.view(B, T, self.max_steps),
            ponder_cost=ponder.view(B, T),
            step_states=None if ctx.step_states is None else [x.view(B, T, d) for x in ctx.step_states],
        )

    # ------------------------------------------------------------------ eager: running tokens only
    def _eager(self, h0: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor | None, ctx: LoopContext):
        n, d = h0.shape
        S = self.max_steps
        device = h0.device
        policy, step = self.policy, self.step
        running = torch.arange(n, device=device) if mask is None else mask.nonzero().squeeze(-1)  # (m,)
        h = h0 if mask is None else h0[running]  # (m, d) state of the running tokens
        tok = token if token is None or mask is None else token[running]  # (m, d)
        acc = torch.zeros_like(h)  # (m, d) Σ w_s h_s so far (policies that weigh their steps)
        state = policy.start(h.shape[0], h)
        full = h0  # (n, d) every token's deepest state (a step that attends: the keys' source)
        if step.attends:
            ctx.kv = {"k": None, "v": None, "state": full, "stale": torch.arange(n, device=device)}
        done_idx, done_out, done_cost, done_steps = [], [], [], []
        prob_idx, prob_step, prob_val = [], [], []
        steps_done = 0
        for s in range(S):
            if running.numel() == 0:
                break
            steps_done = s + 1
            h_new = policy.scale_update(s, h, step(h, s, running, tok, None, ctx), state)
            dec, state = policy.decide(s, h_new, state)
            if dec.weight is not None:
                acc = acc + dec.weight.unsqueeze(-1).to(h_new.dtype) * h_new
            out = acc if dec.weight is not None else h_new  # (m, d) the output of a token halting now
            if policy.halts_early:  # a fixed depth reports 0 everywhere: the zeros below stand
                prob_idx.append(running)
                prob_step.append(torch.full_like(running, s))
                prob_val.append(dec.prob)
            halts = dec.halts
            if ctx.step_states is not None:  # training runs every row every step (TrainedExits)
                ctx.step_states.append(h_new if mask is None else h0.index_copy(0, running, h_new))
            if step.attends:
                full = h_new if running.shape[0] == n else full.index_copy(0, running, h_new)
                ctx.kv["state"], ctx.kv["stale"] = full, running  # every processed row changed
            if not policy.halts_early:  # fixed depth: nobody halts before the last step, everybody at it
                if s < S - 1:
                    h = h_new
                    continue
                done_idx.append(running)
                done_out.append(out)
                done_cost.append(h.new_zeros(running.shape[0], dtype=torch.float32))
                done_steps.append(torch.full_like(running, S))
                break
            if not bool(halts.any()):  # nobody halts: no gather, no scatter (and none in backward; no
                h = h_new  #              host sync either for a fixed depth, above)
                continue
            done_idx.append(running[halts])
            done_out.append(out[halts])
            done_cost.append(dec.cost[halts] if dec.cost is not None else h.new_zeros(done_idx[-1].shape[0], dtype=torch.float32))
            done_steps.append(torch.full_like(done_idx[-1], s + 1))
            keep = ~halts
            running, h = running[keep], h_new[keep]
            acc = acc[keep] if dec.weight is not None else acc
            state = {k: v[keep] for k, v in state.items()}
            tok = None if tok is None else tok[keep]
        if step.attends:
            step.finish(full, ctx.kv["stale"], steps_done, ctx)

        ponder = torch.zeros(n, dtype=torch.float32, device=device)
        probs = torch.zeros(n, S, dtype=torch.float32, device=device)
        if mask is None and not policy.halts_early and done_out:  # every token ran every step, in order
            return done_out[0], torch.full((n,), S, dtype=torch.long, device=device), probs, ponder
        hidden = h0 if mask is not None else h0.new_zeros(n, d)  # padding keeps its state (index_copy is out of place)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        if done_idx:
            idx = torch.cat(done_idx)
            hidden = hidden.index_copy(0, idx, torch.cat(done_out))
            ponder = ponder.index_copy(0, idx, torch.cat(done_cost))
            steps = steps.index_copy(0, idx, torch.cat(done_steps))
        if prob_idx:
            probs = probs.index_put((torch.cat(prob_idx), torch.cat(prob_step)), torch.cat(prob_val))
        return hidden, steps, probs, ponder

    # ------------------------------------------------------------------ static: all tokens, masks
    def _static(self, h0: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor | None, ctx: LoopContext):
        """Fixed shapes only. Every row runs every step with masks, or, with a capacity bound
        (`ExecutionPlan.loop_static_capacity` and a policy that states its shares), each step gathers
        the rows it may run: a fixed number, running rows first (the capacity-bounded gather)."""
        n, d = h0.shape
        S = self.max_steps
        policy, step = self.policy, self.step
        rows = torch.arange(n, device=h0.device)
        running = torch.ones(n, dtype=torch.bool, device=h0.device) if mask is None else mask.clone()
        bounds = self._static_bounds(n)
        h = h0
        acc = torch.zeros_like(h0)
        state = policy.start(n, h0)
        steps = torch.zeros(n, dtype=torch.long, device=h0.device)
        ponder = h0.new_zeros(n, dtype=torch.float32)
        probs = []
        if step.attends:
            ctx.kv = {"k": None, "v": None, "state": h0, "stale": rows}
        for s in range(S):
            if bounds is None or bounds[s] >= n:
                sel, run = rows, running
            else:
                # the bound's rows, running ones first; running rows beyond it halt here (overflow)
                sel = running.to(torch.int8).topk(bounds[s], sorted=False).indices  # (K,)
                run = running[sel]
                overflow = running.clone()
                overflow[sel] = False
                acc = torch.where(overflow.unsqueeze(-1), h, acc)
                running = running & ~overflow
            h_sel = h[sel]
            state_sel = {k: v[sel] for k, v in state.items()}
            tok = None if token is None else token[sel]
            h_new = policy.scale_update(s, h_sel, step(h_sel, s, sel, tok, run, ctx), state_sel)
            dec, new_state = policy.decide(s, h_new, state_sel, valid=run)
            halts = run & dec.halts
            if dec.weight is not None:
                weight = torch.where(run, dec.weight, torch.zeros_like(dec.weight))
                out = acc[sel] + weight.unsqueeze(-1).to(h_new.dtype) * h_new
            else:
                out = torch.where(halts.unsqueeze(-1), h_new, acc[sel])
            acc = acc.index_copy(0, sel, out)
            if dec.cost is not None:
                ponder = ponder.index_copy(0, sel, torch.where(halts, dec.cost, ponder[sel]))
            steps = steps.index_copy(0, sel, steps[sel] + run.long())
            probs.append(torch.zeros_like(ponder).index_copy(0, sel, torch.where(run, dec.prob, torch.zeros_like(dec.prob))))
            state = {k: v.index_copy(0, sel, torch.where(run, new_state[k], state_sel[k])) for k, v in state.items()}
            h = h.index_copy(0, sel, torch.where(run.unsqueeze(-1), h_new, h_sel))
            running = running.index_copy(0, sel, run & ~halts)
            if ctx.step_states is not None:
                ctx.step_states.append(h)
            if step.attends:
                ctx.kv["state"], ctx.kv["stale"] = h, sel
        hidden = acc if mask is None else torch.where(mask.unsqueeze(-1), acc, h0)
        return hidden, steps, torch.stack(probs, dim=-1), ponder

    def _static_bounds(self, rows: int) -> list[int] | None:
        """Rows the static driver gathers at each step, or None (every row, masked)."""
        capacity = getattr(self.policy, "capacity", None)
        if self.static_capacity is None or capacity is None:
            return None
        return [min(rows, math.ceil(self.static_capacity * share * rows)) for share in capacity]

    def losses(self, lm_loss: torch.Tensor, ponder_cost: torch.Tensor, labels: torch.Tensor, num_items_in_batch,
               ponder_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, ponder_loss): `lm_loss + ponder_weight · ponder_loss` when the halting policy's cost is a
        loss term (ACT), else `lm_loss`; the ponder loss is returned on its own either way (as Mixtral
        returns its router loss). `ponder_weight` is read by the caller from the config it trains, which
        the trainer's ponder warm-up changes."""
        ponder = ponder_loss(ponder_cost, labels, num_items_in_batch)
        if self.policy.has_loss and ponder_weight > 0:
            return lm_loss + ponder_weight * ponder.to(lm_loss.dtype), ponder
        return lm_loss, ponder

    # ------------------------------------------------------------------ cost model
    def entries_read(self, steps: torch.Tensor, unit: str = "params") -> torch.Tensor:
        """Entry parameters (`unit="params"`) or pool rows (`"rows"`) a token reads in its first
        `steps` steps; steps may read partitions of different kinds (`pool_partition_retrieval`)."""
        c = self.config
        per_read = c.partition_params_per_read if unit == "params" else c.partition_rows_per_read
        per_step = [per_read(p) for p in c.loop_phase_schedule]
        if len(set(per_step)) == 1:
            return steps * per_step[0]
        cumulative = torch.tensor([0, *per_step], device=steps.device).cumsum(0)  # (S + 1,)
        return cumulative[steps]
