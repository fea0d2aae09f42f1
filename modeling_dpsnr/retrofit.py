"""Retrofit a DPSN-R memory into a pretrained causal LM: `add_memory(model, after_layer=..., memory=...)`.

    input_ids ─ ids hashed (n-gram rows; a memory-mapped pool is asked for them) ─┐
              ─ embed ─ layers 0 .. L ─ h ─ memory ─ layers L+1 .. ─ norm ─ lm_head
                                            h + g ⊙ (loop(h) − h),  g = 0 at first: the pretrained logits, exactly

The pretrained model (`language_model`, any Llama-family causal LM: `model.model.layers`, the standard
attention interface) is not rewritten: its state dict keys are unchanged and the memory is a sibling
module (`memory`) that a forward hook on layer L calls. What the memory needs beyond the layer's
output (hashed rows, token embeddings, the padding mask) travels as one keyword argument through the
model's `**kwargs` to the layers: no state is kept on the model between calls, so a replay of the
layer under gradient checkpointing, hooks included or not, sees the same inputs.

The memory is DPSN-R's reasoning loop over a pool of one or two partitions (hashed n-grams, Engram,
DeepSeek 2026; product keys, Lample et al. 2019, with PEER entries, He 2024): one read per partition
(`memory_loop=False`) or the adaptive loop. The pool's tables are saved in their own safetensors
shards beside model.safetensors, as DPSN-R's (storage.py), and a saved folder loads with
`trust_remote_code=True` where this package is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache

from .cache import CACHE_NAME, one_cache, output_cache
from .configuration_dpsnr import DPSNRConfig
from .configuration_retrofit import DPSNRRetrofitConfig
from .execution import ExecutionMixin, ExecutionPlan
from .hashed import ngram_cache_layer
from .modeling_dpsnr import DPSNRPreTrainedModel
from .outputs import DPSNRCausalLMOutputWithPast
from .reads import PoolRead
from .reasoning import LoopOutput, ReasoningLoop, loop_token_mask
from .storage import PoolStorageMixin

MEMORY_KWARG = "dpsnr_memory"  # the keyword the memory's inputs travel under, down to the decoder layers


@dataclass
class MemoryInputs:
    """What the memory reads besides the hidden states, for one forward."""

    read: PoolRead  # how this forward reads the pool: the loop driver's read mode, rows hashed from the ids
    token_embeddings: torch.Tensor  # (B, T, d) for pool_query_input="state+token"
    token_mask: torch.Tensor | None  # (B, T) bool, False for padding
    loop: LoopOutput | None = None  # filled by the memory: steps, halting, ponder cost


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.model.layers: add_memory needs a Llama-family causal LM.")
    return layers


class RetrofitMemory(nn.Module):
    """DPSN-R's reasoning loop over the memory pool, added through a zero-initialised gate."""

    def __init__(self, config: DPSNRConfig):
        super().__init__()
        self.config = config
        self.loop = ReasoningLoop(config)
        # ReZero (Bachlechner et al. 2020): zero at first, so the read changes nothing until trained,
        # while its gradient, (loop(h) − h), is not zero.
        self.gate = nn.Parameter(torch.zeros(config.hidden_size))  # (d,)
        self.cache_layer = ngram_cache_layer(config)  # the cache layer holding the token ids

    def forward(self, hidden_states: torch.Tensor, inputs: MemoryInputs) -> torch.Tensor:
        out = self.loop(hidden_states, inputs.token_mask, inputs.read, token_embeddings=inputs.token_embeddings)
        inputs.loop = out
        return hidden_states + self.gate.to(hidden_states.dtype) * (out.hidden_states - hidden_states)  # (B, T, d)

    def after_layer(self, module, args, kwargs, output):
        """Forward hook on the chosen decoder layer: its output, plus the memory read."""
        inputs = kwargs.get(MEMORY_KWARG)
        if inputs is None:
            raise RuntimeError("this decoder layer carries a DPSN-R memory: call the DPSNRRetrofitForCausalLM, not "
                               "its language_model, so the memory gets its inputs.")
        if isinstance(output, tuple):  # older layers return (hidden_states, ...)
            return (self(output[0], inputs), *output[1:])
        return self(output, inputs)


class _PoolConfigView:
    """Lets `DPSNRPreTrainedModel._init_weights` initialise the memory's modules from the pool's config."""

    def __init__(self, config: DPSNRConfig):
        self.config = config


class DPSNRRetrofitForCausalLM(PoolStorageMixin, ExecutionMixin, PreTrainedModel, GenerationMixin):
    """A pretrained causal LM (`language_model`) with a DPSN-R memory (`memory`) after one of its layers.

    Build one with `add_memory(model, ...)`; save and load it as any transformers model (the pool in its
    own shards, `from_pretrained(path, pool_mmap=True)` maps it read-only). `set_execution` chooses the
    loop driver and sparse pool gradients, as for DPSN-R.
    """

    config_class = DPSNRRetrofitConfig
    config: DPSNRRetrofitConfig
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: DPSNRRetrofitConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        self.memory = RetrofitMemory(config.pool_config())
        decoder_layers(self.language_model)[config.memory_layer].register_forward_hook(self.memory.after_layer,
                                                                                       with_kwargs=True)
        self._execution = ExecutionPlan()
        self.post_init()

    @property
    def pool(self):
        return self.memory.loop.pool

    @property
    def pool_config(self) -> DPSNRConfig:
        """The memory's DPSNRConfig (storage.py reads the pool's table shapes from it)."""
        return self.memory.config

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def memory_parameters(self) -> list[nn.Parameter]:
        """The parameters `add_memory` adds (and leaves trainable)."""
        return list(self.memory.parameters())

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The language model's modules are initialised (or loaded) by the language model itself: transformers
        # dispatches its own `_init_weights` to it. Here: the memory, as DPSN-R initialises these modules.
        DPSNRPreTrainedModel._init_weights(_PoolConfigView(self.memory.config), module)
        if isinstance(module, RetrofitMemory):
            init.zeros_(module.gate)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> DPSNRCausalLMOutputWithPast:
        cache = one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        text_config = self.config.text_config
        use_cache = use_cache if use_cache is not None else (getattr(text_config, "use_cache", True) and not self.training)
        if use_cache and cache is None:  # made here: the hashed read keeps the ids in it
            cache = DynamicCache(config=text_config)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # How this forward reads the pool, decided once; hashed rows are known from the ids alone: hashed,
        # and asked for, before any layer runs.
        read = self.pool.plan_read(self.execution.static_loop(inputs_embeds), input_ids, attention_mask, cache,
                                   self.memory.cache_layer)
        token_mask = loop_token_mask(attention_mask, inputs_embeds.shape[1], read.static)  # padding skips the loop
        inputs = MemoryInputs(read, inputs_embeds, token_mask)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
            use_cache=use_cache, logits_to_keep=logits_to_keep, **{CACHE_NAME: cache, MEMORY_KWARG: inputs}, **kwargs,
        )
        loss = lm_loss = ponder_loss = None
        if labels is not None and inputs.loop is not None:
            lm_loss = outputs.loss
            loss, ponder_loss = self.memory.loop.losses(lm_loss, inputs.loop.ponder_cost, labels,
                                                        kwargs.get("num_items_in_batch"), self.memory.config.loop_ponder_weight)
        return DPSNRCausalLMOutputWithPast(
            loss=loss, lm_loss=lm_loss, ponder_loss=ponder_loss, logits=outputs.logits,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            reasoning_steps=None if inputs.loop is None else inputs.loop.steps,
            halting_probs=None if inputs.loop is None else inputs.loop.halting_probs,
            **{CACHE_NAME: output_cache(outputs) if use_cache else None},
        )


def add_memory(
    model: PreTrainedModel,
    after_layer: int,
    memory: str = "hashed",
    *,
    loop: bool = False,
    freeze_base: bool = True,
    **pool,
) -> DPSNRRetrofitForCausalLM:
    """Insert a DPSN-R memory read into the pretrained causal LM `model`, after decoder layer `after_layer`.

    memory: "hashed" (n-gram rows, Engram), "product_key" (product-key memory) or "both".
    loop: False reads each partition once; True runs DPSN-R's adaptive reasoning loop over them.
    freeze_base: only the memory's parameters stay trainable (`model.memory_parameters()`). For a LoRA
        on the base as well, wrap the result with PEFT (`get_peft_model(retrofitted, LoraConfig(...))`)
        and set `requires_grad` back on `memory_parameters()`: PEFT freezes everything but its adapters.
    pool: DPSNRConfig fields of the memory (`pool_size`, `pool_heads`, `pool_topk`, `pool_entry`,
        `ngram_orders`, `ngram_heads`, `loop_max_steps`, ...).

    The returned model wraps `model` itself (no copy) and gives exactly its logits until trained. The
    memory gets `model`'s dtype and device.
    """
    decoder_layers(model)
    # The configs share `model.config`, and a composite config hands its attention implementation down
    # to its sub-configs: it must be the model's own, or the logits change.
    config = DPSNRRetrofitConfig(text_config=model.config, memory=memory, memory_layer=after_layer,
                                 memory_loop=loop, memory_pool=pool or None,
                                 attn_implementation=model.config._attn_implementation)
    retrofitted = DPSNRRetrofitForCausalLM(config, language_model=model)
    reference = next(model.parameters())
    retrofitted.memory.to(device=reference.device, dtype=reference.dtype)
    if freeze_base:
        model.requires_grad_(False)
    return retrofitted


__all__ = ["DPSNRRetrofitForCausalLM", "MemoryInputs", "RetrofitMemory", "add_memory"]
