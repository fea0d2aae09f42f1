"""DPSN-R for transformers: `DPSNRConfig`, `DPSNRModel`, `DPSNRForCausalLM`.

Importing the package registers the classes with the Auto factories, so
`AutoModelForCausalLM.from_pretrained(path)` works for an installed package; checkpoints also
carry `auto_map` so that `trust_remote_code=True` works without installing it.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_dpsnr import DPSNRConfig
from .configuration_retrofit import DPSNRRetrofitConfig
from .modeling_dpsnr import DPSNRForCausalLM, DPSNRModel, DPSNRPreTrainedModel
from .outputs import DPSNRCausalLMOutputWithPast, DPSNRModelOutputWithPast
from .retrofit import DPSNRRetrofitForCausalLM, add_memory

AutoConfig.register("dpsnr", DPSNRConfig, exist_ok=True)
AutoModel.register(DPSNRConfig, DPSNRModel, exist_ok=True)
AutoModelForCausalLM.register(DPSNRConfig, DPSNRForCausalLM, exist_ok=True)
AutoConfig.register("dpsnr_retrofit", DPSNRRetrofitConfig, exist_ok=True)
AutoModelForCausalLM.register(DPSNRRetrofitConfig, DPSNRRetrofitForCausalLM, exist_ok=True)

__all__ = [
    "DPSNRConfig",
    "DPSNRPreTrainedModel",
    "DPSNRModel",
    "DPSNRForCausalLM",
    "DPSNRCausalLMOutputWithPast",
    "DPSNRModelOutputWithPast",
    "DPSNRRetrofitConfig",
    "DPSNRRetrofitForCausalLM",
    "add_memory",
]

# Saved checkpoints carry `auto_map` and a flat copy of these files, so they load with
# `trust_remote_code=True` where this package is not installed.
DPSNRConfig.register_for_auto_class()
DPSNRModel.register_for_auto_class("AutoModel")
DPSNRForCausalLM.register_for_auto_class("AutoModelForCausalLM")
DPSNRRetrofitConfig.register_for_auto_class()
DPSNRRetrofitForCausalLM.register_for_auto_class("AutoModelForCausalLM")
