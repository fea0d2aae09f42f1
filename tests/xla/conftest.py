"""XLA checks, run by scripts/check_xla.sh in a virtualenv with torch_xla (PJRT_DEVICE=CPU).

Without torch_xla (the project's own venv) every test here is skipped. The tests record what they
measured (fallback ops, compile counts, differences to the CPU reference) in the session summary
the script prints (tests/device_checks.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from device_checks import DeviceChecks

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HAVE_XLA = importlib.util.find_spec("torch_xla") is not None
# The one CPU fallback a training step may keep: reading a scalar back to the host (`.item()`,
# `bool(t)`) for input validation and logging. It ends the traced graph there, but lowers nothing.
ALLOWED_FALLBACKS = {"aten::_local_scalar_dense"}
CHECKS = DeviceChecks(Path(__file__).resolve().parent, HAVE_XLA,
                      "torch_xla is not installed; scripts/check_xla.sh builds a venv with it")


def pytest_collection_modifyitems(config, items):
    CHECKS.skip_if_unavailable(items)


def pytest_sessionfinish(session, exitstatus):
    CHECKS.write_summary()


@pytest.fixture
def record():
    return CHECKS.record


class XLAMetrics:
    """Compile count and CPU fallback ops of torch_xla's debug metrics, since the last reset."""

    def __init__(self):
        import torch_xla.debug.metrics as met

        self.met = met
        met.clear_all()

    def compiles(self) -> int:
        data = self.met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def fallbacks(self) -> list[str]:
        return sorted(self.met.executed_fallback_ops())

    def unexpected_fallbacks(self) -> list[str]:
        return [op for op in self.fallbacks() if op not in ALLOWED_FALLBACKS]


@pytest.fixture
def xla_metrics():
    return XLAMetrics()
