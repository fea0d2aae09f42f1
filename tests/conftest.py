"""Shared fixtures: tiny configurations that build and run in milliseconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_prelude_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pool_size=300, pool_heads=2, pool_topk=3, pool_key_dim=16, loop_max_steps=4,
)


def tiny_config(**overrides) -> DPSNRConfig:
    kwargs = dict(TINY)
    kwargs.update(overrides)
    return DPSNRConfig(**kwargs)


def tiny_model(seed: int = 0, execution: dict | None = None, **overrides) -> DPSNRForCausalLM:
    """A tiny model; `execution` goes to `model.set_execution` (how it runs, not what it is)."""
    torch.manual_seed(seed)
    model = DPSNRForCausalLM(tiny_config(**overrides))
    if execution:
        model.set_execution(**execution)
    return model


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model().eval()
