"""CUDA checks, run by scripts/check_gpu.sh on a machine with an NVIDIA GPU.

Without CUDA (CI, the project's CPU venv) every test here is skipped. Each test records what it
measured (differences to the CPU reference, losses) in a session summary written as JSON to
$DPSNR_GPU_SUMMARY at the end, for the script to print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
_SUMMARY: dict = {}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device; scripts/check_gpu.sh runs these on a GPU machine")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DPSNR_GPU_SUMMARY")
    if path and _SUMMARY:
        Path(path).write_text(json.dumps(_SUMMARY, indent=2, sort_keys=True))


@pytest.fixture(autouse=True)
def _exact_float32():
    """Compare against the CPU in true float32: no TF32 in matmuls or convolutions."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def record():
    """record(name, **figures): add one test's measurements to the JSON summary."""

    def _record(name: str, **figures):
        _SUMMARY[name] = figures

    return _record
