"""DPSN-R: a transformer controller with an adaptive reasoning loop over a large parameter pool.

    input_ids ─ embed ─ prelude blocks ─ h0 ─ reasoning loop (reasoning.py, pool.py) ─ h*
              ─ coda blocks ─ norm ─ lm_head (tied to embed) ─ logits

Output classes and generation statistics: outputs.py; RMSNorm: norms.py; the KV cache's name: cache.py.

Controller blocks follow transformers' Llama (pre-norm, RMSNorm, RoPE, SwiGLU, attention through
the attention-function registry so eager / sdpa / flash work, KV cache through `Cache`). The loop
sits between prelude and coda, so the coda's attention mixes retrieved knowledge across positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .cache import CACHE_NAME, one_cache, output_cache
from .configuration_dpsnr import DPSNRConfig
from .cost import flops_per_token, pool_bytes_per_token
from .execution import ExecutionMixin, ExecutionPlan, is_exporting, is_tracing
from .halting import ThresholdRouting, TrainedExits
from .hashed import NgramPreludeRead, ngram_cache_layer
from .norms import DPSNRRMSNorm, RunningQueryNorm
from .outputs import DPSNRCausalLMOutputWithPast, DPSNRModelOutputWithPast, ReasoningStatsCollector
from .reasoning import ReasoningLoop, TokenStep, loop_token_mask
from .storage import PoolStorageMixin


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------- leaves (DPSNRRMSNorm: norms.py)
def rope_type_of(config: DPSNRConfig) -> str:
    return (config.rope_parameters or {}).get("rope_type", "default")


class DPSNRRotaryEmbedding(nn.Module):
    """RoPE tables (Su et al. 2021); scaled variants (linear, dynamic, yarn, ...) come from transformers'
    ROPE_INIT_FUNCTIONS, and `dynamic_rope_update` recomputes the dynamic ones as positions grow."""

    def __init__(self, config: DPSNRConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = rope_type_of(config)
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DPSNRConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.attention_head_dim
        base = config.rope_theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
        return inv_freq, 1.0

    # No `torch.no_grad()` (transformers' Llama in 5.24 has none either): nothing here carries gradients (integer
    # positions, a buffer), and the grad-mode switch would be a higher-order op in every exported graph.
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kvH, T, hd) → (B, kvH·n_rep, T, hd) for grouped-query attention."""
    if n_rep == 1:
        return x
    B, kvh, T, hd = x.shape
    return x[:, :, None].expand(B, kvh, n_rep, T, hd).reshape(B, kvh * n_rep, T, hd)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = attn_weights.float().softmax(dim=-1).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    out = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, Tq, H, hd)
    return out, attn_weights


class DPSNRMLP(nn.Module):
    """SwiGLU (Shazeer 2020)."""

    def __init__(self, config: DPSNRConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DPSNRAttention(nn.Module):
    """Causal self-attention with RoPE through transformers' attention-function registry. Its
    stages (`queries`, `keys_values`, `attend`) are also used on their own by the loop's block step,
    which projects only the rows still running and reuses the keys of halted ones."""

    def __init__(self, config: DPSNRConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.attention_head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(..., d) → (..., H, hd), rotated; cos/sin (..., hd)."""
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))
        return q * cos.unsqueeze(-2) + rotate_half(q) * sin.unsqueeze(-2)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) → keys (rotated) and values, (..., kvH, hd) each."""
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        return k * cos.unsqueeze(-2) + rotate_half(k) * sin.unsqueeze(-2), v

    def attend(self, q, k, v, attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, Tq, hd), k / v (B, kvH, Tk, hd) → (B, Tq, H·hd) before o_proj, and the weights."""
        attention_fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_fn(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return out.reshape(*out.shape[:2], -1).contiguous(), weights

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        cos, sin = position_embeddings  # (B, T, hd)
        q = self.queries(hidden_states, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.keys_values(hidden_states, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, kvH, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = self.attend(q, k, v, attention_mask, **kwargs)
        return self.o_proj(out), weights


class DPSNRDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm controller block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: DPSNRConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DPSNRAttention(config, layer_idx)
        self.mlp = DPSNRMLP(config)
        self.input_layernorm = DPSNRRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DPSNRRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, past_key_values=None,
                **kwargs):
        # The cache arrives under the installed release's name (CACHE_NAME), the one transformers'
        # gradient-checkpointing wrapper clears when it recomputes the block.
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask,
            one_cache(cache, past_key_values), **kwargs
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights


# ---------------------------------------------------------------------------- models
# PoolStorageMixin (storage.py): the pool in its own safetensors shards, memory-mapped loading,
# knowledge injection (write_pool_rows) and place_controller.
class DPSNRPreTrainedModel(PoolStorageMixin, ExecutionMixin, PreTrainedModel):
    config_class = DPSNRConfig
    config: DPSNRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DPSNRDecoderLayer", "ReasoningLoop"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # torch.compile(fullgraph=True) and torch.export trace the static loop driver (ExecutionPlan
    # loop_mode "auto" picks it while tracing); tests/test_export.py checks both against eager, and
    # static-cache generation against the dynamic cache. `__init__` clears it for dynamic RoPE.
    _can_compile_fullgraph = True

    def __init__(self, config: DPSNRConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        if "dynamic" in rope_type_of(config):
            # transformers' `dynamic_rope_update` recomputes the frequencies when a longer sequence
            # arrives: a Python branch on a tensor value, which one graph cannot hold.
            self._can_compile_fullgraph = False

    # ------------------------------------------------------------------ cost model (cost.py)
    def estimate_flops(self, steps: float | None = None, context: float | None = None, training: bool = False) -> float:
        """FLOPs per token at `steps` mean reasoning steps (default: the maximum) and `context` keys
        per query (default: half the trained context); × 3 for a training step, which for trained exits
        follows the execution's `exit_samples`. See cost.py."""
        return flops_per_token(self.config, steps, context, training, self.execution.exit_samples)

    def estimate_pool_bytes(self, steps: float | None = None) -> float:
        """Pool bytes one token reads (entry rows + scored sub-keys) at the tables' dtype."""
        tables = self.base_model.loop.pool.entry_parameters()
        return pool_bytes_per_token(self.config, steps, tables[0].element_size() if tables else 4)

    def count_parameters(self) -> tuple[int, int]:
        """(total, active): every parameter once (the LM head is tied to the embedding), and the
        `active_params` of a token that runs every reasoning step: non-embedding controller and loop
        modules, the entries of all its steps and the prelude read. Works on the meta device; the
        presets' MEASURED counts come from here (`dpsnr presets`)."""
        total = sum(p.numel() for p in self.parameters())  # tied weights are yielded once
        base, c = self.base_model, self.config
        entries = sum(c.partition_params_per_read(p) for p in c.loop_phase_schedule)
        return total, base.active_params_base() + entries + base.prelude_reads()

    # ------------------------------------------------------------------ execution (not architecture)
    def _execution_owner(self):
        """The plan (`execution`, `set_execution`: execution.ExecutionMixin) lives on the base model,
        whose forward reads it, so DPSNRForCausalLM and its DPSNRModel share one."""
        return self.base_model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' `init` functions skip tensors already loaded from a checkpoint
        # (`_is_hf_initialized`), so this never overwrites loaded weights.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                if getattr(module, "is_halting_head", False):
                    # σ(b) ≈ 0.1 so an untrained model runs most steps: earlier implementations
                    # halted at step 1 from init, and later partitions never trained.
                    init.constant_(module.bias, self.config.loop_halt_bias_init)
                elif getattr(module, "is_exit_head", False):  # trained exits: uniform over the steps
                    init.copy_(module.bias, torch.tensor(TrainedExits.init_bias(self.config.loop_max_steps),
                                                         dtype=module.bias.dtype))
                else:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (DPSNRRMSNorm, nn.LayerNorm, RunningQueryNorm)):
            if module.weight is not None:  # LayerNorm(elementwise_affine=False) has none
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if isinstance(module, RunningQueryNorm):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.calibrated)
                init.zeros_(module.pending)
        elif isinstance(module, DPSNRRotaryEmbedding):
            if module.rope_type == "default":
                inv_freq, _ = module.compute_default_rope_parameters(module.config)
            else:
                inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        elif isinstance(module, TokenStep):  # and BlockStep
            init.normal_(module.step_embedding, mean=0.0, std=std)
        elif isinstance(module, ThresholdRouting):
            init.zeros_(module.thresholds)
            init.zeros_(module.calibrated)
            capacity = torch.tensor(self.config.loop_capacity, dtype=torch.float32)
            init.copy_(module.pass_rate, capacity[1:] / capacity[:-1])
        elif hasattr(module, "init_weights_"):  # the pool's modules: entry tables, sub-keys, stripes, hash constants
            module.init_weights_(std)


class DPSNRModel(DPSNRPreTrainedModel):
    """Embeddings, prelude blocks, reasoning loop, coda blocks and final norm."""

    def __init__(self, config: DPSNRConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DPSNRDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.loop = ReasoningLoop(config, DPSNRAttention)
        # A hashed n-gram partition read once in the prelude as well (hashed.py), if configured.
        self.ngram_read = (NgramPreludeRead(config, self.loop.pool)
                           if config.ngram_prelude_partition is not None else None)
        self.norm = DPSNRRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DPSNRRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._execution = ExecutionPlan()
        self.post_init()

    @property
    def pool(self):
        return self.loop.pool

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DPSNRModelOutputWithPast | tuple:
        cache = one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        # Data-dependent checks (host syncs) run on eager inputs only: never inside a compiled or
        # exported graph, and not on the one-token decoding steps of a cache.
        past_seen = cache.get_seq_length() if cache is not None else 0
        check = not is_tracing() and past_seen == 0
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
            if check and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
                raise ValueError(
                    f"input_ids contain ids outside [0, {self.config.vocab_size}) (vocab_size): "
                    f"min {int(input_ids.min())}, max {int(input_ids.max())}. Is the tokenizer the model's?"
                )
            inputs_embeds = self.embed_tokens(input_ids)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # How this forward reads the pool, decided once: the loop driver's read mode, and the rows of hashed
        # n-gram partitions, known from the ids alone, hashed (and a memory-mapped pool asked for their
        # pages) before any block runs; earlier ids come from the cache.
        read = self.loop.pool.plan_read(self.execution.static_loop(inputs_embeds), input_ids, attention_mask, cache,
                                        ngram_cache_layer(self.config), sum_table_grads=True)

        B, T = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past_seen).unsqueeze(0)
        if check:
            self._check_positions(position_ids, attention_mask, past_seen, T)
        if is_exporting() and "dynamic" in self.rotary_emb.rope_type:
            raise RuntimeError(
                f"rope_type={self.rotary_emb.rope_type!r} cannot be exported: transformers' dynamic_rope_update "
                "recomputes the RoPE frequencies when a longer sequence arrives, a branch on tensor values that "
                "torch.export cannot capture. Export a model with the default, linear or yarn RoPE."
            )
        causal_mask = create_causal_mask(  # positional: the cache argument's name differs across 5.x releases
            self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        num_prelude = self.config.num_prelude_layers

        def run_blocks(h, blocks):
            for block in blocks:
                if all_hidden is not None:
                    all_hidden.append(h)
                h, w = block(
                    h,
                    attention_mask=causal_mask,
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    **{CACHE_NAME: cache},
                    **kwargs,
                )
                if all_attn is not None:
                    all_attn.append(w)
            return h

        split = num_prelude if self.ngram_read is None else self.ngram_read.layer
        hidden_states = run_blocks(hidden_states, self.layers[:split])
        if self.ngram_read is not None:
            hidden_states = self.ngram_read(hidden_states, read)
        hidden_states = run_blocks(hidden_states, self.layers[split:num_prelude])
        token_mask = loop_token_mask(attention_mask, T, read.static)  # padding skips the loop
        loop = self.loop(
            hidden_states, token_mask, read, token_embeddings=inputs_embeds,
            position_embeddings=position_embeddings, attention_mask=causal_mask, cache=cache,
        )
        hidden_states = run_blocks(loop.hidden_states, self.layers[num_prelude:])
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        exit_hidden = None
        if loop.step_states is not None:  # trained exits: the coda and norm on earlier steps' states too
            exit_hidden = []
            trained = self._earlier_exits_to_train(len(loop.step_states) - 1)
            for i, state in enumerate(loop.step_states[:-1]):
                if i not in trained:  # not drawn this forward (execution.exit_samples)
                    exit_hidden.append(None)
                    continue
                for block in self.layers[num_prelude:]:
                    state, _ = block(state, attention_mask=causal_mask, position_embeddings=position_embeddings,
                                     position_ids=position_ids, **{CACHE_NAME: None}, **kwargs)
                exit_hidden.append(self.norm(state))
            exit_hidden = (*exit_hidden, hidden_states)

        output = DPSNRModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
            reasoning_steps=loop.steps,
            halting_probs=loop.halting_probs,
            ponder_cost=loop.ponder_cost,
            exit_hidden_states=exit_hidden,
            active_params=self.active_params_base() + self.loop.entries_read(loop.steps) + self.prelude_reads("params"),
            **{CACHE_NAME: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _earlier_exits_to_train(self, earlier: int) -> set[int]:
        """The earlier exits (0-based steps before the last) a training forward runs the coda on: all of
        them, or `execution.exit_samples` drawn uniformly without replacement (the gate objective
        compares consecutive exits, so it always takes all)."""
        plan = self.execution
        m = plan.exit_samples
        if m is None or m >= earlier or plan.exit_objective == "gate":
            return set(range(earlier))
        return set(torch.randperm(earlier)[:m].tolist())

    def _check_positions(self, position_ids: torch.Tensor, attention_mask, past_seen: int, T: int) -> None:
        """Positions, not row lengths, are what RoPE can represent: a packed row of several short
        sequences is fine, and scaled RoPE (linear, dynamic, yarn, ...) extends the trained context."""
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] != past_seen + T:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = {past_seen + T}."
            )
        if self.rotary_emb.rope_type != "default" or not position_ids.numel():
            return
        if position_ids.min() < 0 or position_ids.max() >= self.config.max_position_embeddings:
            raise ValueError(
                f"position_ids reach {int(position_ids.max())}, beyond max_position_embeddings "
                f"({self.config.max_position_embeddings}) of this model's default RoPE; pass shorter "
                "sequences, or set a scaled rope_parameters (linear, dynamic, yarn) to extend the context."
            )

    # ------------------------------------------------------------------ cost model
    def prelude_reads(self, unit: str = "params") -> int:
        """Entry parameters (or rows, `unit="rows"`) every token reads outside the loop: the prelude's
        hashed n-gram read, if any."""
        if self.ngram_read is None:
            return 0
        return self.ngram_read.params_per_token if unit == "params" else self.ngram_read.rows_per_token

    def rows_read(self, steps: torch.Tensor) -> torch.Tensor:
        """Pool rows a token reads when its loop runs `steps` steps (prelude read included)."""
        return self.loop.entries_read(steps, "rows") + self.prelude_reads("rows")

    def active_params_base(self) -> int:
        """Parameters every token touches regardless of its steps: controller blocks, norms and
        the loop's own modules (queries, sub-keys, gate, halting head). Embedding excluded."""
        if getattr(self, "_active_base", None) is None:
            pool_tables = {id(p) for p in self.loop.pool.entry_parameters()}
            embed = {id(p) for p in self.embed_tokens.parameters()}
            self._active_base = sum(p.numel() for p in self.parameters() if id(p) not in pool_tables | embed)
        return self._active_base


class DPSNRForCausalLM(DPSNRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DPSNRConfig):
        super().__init__(config)
        self.model = DPSNRModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._stats_collector: ReasoningStatsCollector | None = None
        self.post_init()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DPSNRForCausalLM":
        """A freshly initialised model of a named preset (see `presets.py`)."""
        return cls(DPSNRConfig.from_preset(name, **overrides))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def pool(self):
        return self.model.loop.pool

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> DPSNRCausalLMOutputWithPast | tuple:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=one_cache(cache, past_key_values),
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])

        loss = lm_loss = ponder_loss = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}.")
            if outputs.exit_hidden_states is not None:
                full = logits if logits.shape[1] == hidden.shape[1] else None  # the last exit's, when not cut
                loss, lm_loss, ponder_loss = self._exit_losses(outputs, labels, num_items_in_batch, full)
            else:
                lm_loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                    num_items_in_batch=num_items_in_batch, **kwargs,
                )
                loss, ponder_loss = self.model.loop.losses(lm_loss, outputs.ponder_cost, labels, num_items_in_batch,
                                                           self.config.loop_ponder_weight)

        output = DPSNRCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            ponder_loss=ponder_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reasoning_steps=outputs.reasoning_steps,
            halting_probs=outputs.halting_probs,
            active_params=outputs.active_params,
            **{CACHE_NAME: output_cache(outputs)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def _exit_losses(self, outputs: DPSNRModelOutputWithPast, labels: torch.Tensor, num_items_in_batch,
                     last_logits: torch.Tensor | None = None):
        """Trained exits (halting.TrainedExits): lm_loss = Σ_s p_s·CE_s, the expected next-token loss
        over the exits, and ponder_loss = −H(p), both per label token (summed over a batch and divided
        by `num_items_in_batch` when given, as transformers' causal-LM loss is);
        loss = lm_loss + loop_ponder_weight · ponder_loss. When the forward computed only a sample of the
        earlier exits (None in `exit_hidden_states`: `execution.exit_samples`), lm_loss is an unbiased
        estimate of the expected loss (`_sampled_expected_loss`). With the execution's
        `exit_objective="gate"` the ponder loss is instead the exit head's fit to whether each next
        step lowered the loss (`TrainedExits.gate_loss`), and it is the whole loss."""
        targets = labels[:, 1:]  # (B, T-1)
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0)
        per_exit = []
        exits = outputs.exit_hidden_states  # S × (B, T, d) or None where not drawn; the last is the forward's own output
        computed = [i for i, h in enumerate(exits) if h is not None]
        for i in computed:
            reuse = i == len(exits) - 1 and last_logits is not None
            logits = last_logits[:, :-1] if reuse else self.lm_head(exits[i][:, :-1])
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
            per_exit.append(-logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1))  # (B, T-1)
        ce = torch.stack(per_exit, dim=-1)  # (B, T-1, C) the computed exits
        p = outputs.halting_probs[:, :-1]  # (B, T-1, S) the exit distribution
        gate = self.model.execution.exit_objective == "gate"
        if len(computed) == len(exits):
            expected = (p * ce).sum(-1)
        else:
            expected = self._sampled_expected_loss(p, ce, computed)
        if gate:
            term = TrainedExits.gate_loss(p, ce.detach(), self.config.loop_min_steps)
        else:
            term = (p * torch.log(p.clamp_min(1e-12))).sum(-1)  # −H(p)
        count = valid.sum() if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(count):
            count = count.to(expected.device)
        lm_loss = torch.where(valid, expected, 0.0).sum() / count
        ponder_loss = torch.where(valid, term, 0.0).sum() / count
        if gate:
            return ponder_loss, lm_loss, ponder_loss
        return lm_loss + self.config.loop_ponder_weight * ponder_loss, lm_loss, ponder_loss

    @staticmethod
    def _sampled_expected_loss(p: torch.Tensor, ce: torch.Tensor, computed: list[int]) -> torch.Tensor:
        """Σ_s p_s·ĈE_s from a sample of m earlier exits (`execution.exit_samples`): the last exit's loss
        CE_S (always computed) stands in for every earlier one, and each drawn exit adds its gap to it
        scaled by (S − 1) / m:  ĈE_s = sg(CE_S) + (S − 1)/m · 1[s drawn] · (CE_s − sg(CE_S)),  ĈE_S = CE_S.
        Unbiased (E ĈE_s = CE_s), and the exit head's gradient ∂/∂p_s = ĈE_s is a loss for every exit:
        scaling the drawn exits' whole losses instead (the plain importance weight) leaves the others at
        zero, and the head learned to put its mass wherever this forward did not look (measured: the exit
        distribution collapsed and training diverged). sg = stop-gradient, so the model's gradient is the
        last exit's plus the drawn exits' scaled by (S − 1) / m: unbiased too. p (B, T-1, S), ce (B, T-1, C)."""
        S, drawn = p.shape[-1], len(computed) - 1
        last = ce[..., -1:]  # (B, T-1, 1)
        stand_in = last.detach().expand(*ce.shape[:-1], S - 1).clone()  # (B, T-1, S-1)
        idx = torch.tensor(computed[:-1], device=ce.device)
        gap = (ce[..., :-1] - last.detach()) * ((S - 1) / drawn)
        estimate = stand_in.index_add(-1, idx, gap)  # (B, T-1, S-1)
        return (p[..., :-1] * estimate).sum(-1) + p[..., -1] * last.squeeze(-1)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """generate's step between two forwards: where the reasoning statistics of a forward are recorded.
        Not in `forward`: a compiled decoding step (static cache) would recompile for every token that
        appended to the collector's list."""
        if self._stats_collector is not None and getattr(outputs, "reasoning_steps", None) is not None:
            self._stats_collector.record(outputs.reasoning_steps, outputs.active_params)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def generate(self, *args, return_reasoning_stats: bool = False, **kwargs):
        """`GenerationMixin.generate`, unchanged in behaviour, plus reasoning statistics.

        Per generated token it records the loop's steps, the active parameters and the pool rows
        read (the rows of each step's partition, plus a prelude n-gram read: `DPSNRModel.rows_read`),
        and `avg_loops`. With `return_dict_in_generate=True` the output carries them as
        `reasoning_stats`; with `return_reasoning_stats=True` the call returns `(output, stats)`.
        """
        collector = ReasoningStatsCollector(self.model.rows_read)
        previous, self._stats_collector = self._stats_collector, collector
        try:
            output = super().generate(*args, **kwargs)
        finally:
            self._stats_collector = previous
        stats = collector.summary()
        if isinstance(output, ModelOutput):
            output["reasoning_stats"] = stats
        return (output, stats) if return_reasoning_stats else output


__all__ = [
    "DPSNRPreTrainedModel",
    "DPSNRModel",
    "DPSNRForCausalLM",
    "DPSNRCausalLMOutputWithPast",
    "DPSNRModelOutputWithPast",
]
