"""CUDA checks, run by scripts/check_gpu.sh on a machine with an NVIDIA GPU.

Without CUDA (CI, the project's CPU venv) every test here is skipped. Each test records what it
measured (differences to the CPU reference, losses) in the session summary the script prints
(tests/device_checks.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from device_checks import DeviceChecks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHECKS = DeviceChecks(Path(__file__).resolve().parent, torch.cuda.is_available(),
                      "no CUDA device; scripts/check_gpu.sh runs these on a GPU machine")


def pytest_collection_modifyitems(config, items):
    CHECKS.skip_if_unavailable(items)


def pytest_sessionfinish(session, exitstatus):
    CHECKS.write_summary()


@pytest.fixture(autouse=True)
def _exact_float32():
    """Compare against the CPU in true float32: no TF32 in matmuls or convolutions."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def record():
    return CHECKS.record
