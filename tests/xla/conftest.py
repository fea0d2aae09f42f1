"""XLA checks, run by scripts/check_xla.sh in a virtualenv with torch_xla (PJRT_DEVICE=CPU).

Without torch_xla (the project's own venv) every test here is skipped. The tests record what they
measured (fallback ops, compile counts, differences to the CPU reference) in a session summary that
is written as JSON to $DPSNR_XLA_SUMMARY at the end, for the script to print.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
HAVE_XLA = importlib.util.find_spec("torch_xla") is not None
# The one CPU fallback a training step may keep: reading a scalar back to the host (`.item()`,
# `bool(t)`) for input validation and logging. It ends the traced graph there, but lowers nothing.
ALLOWED_FALLBACKS = {"aten::_local_scalar_dense"}
_SUMMARY: dict = {}


def pytest_collection_modifyitems(config, items):
    if HAVE_XLA:
        return
    skip = pytest.mark.skip(reason="torch_xla is not installed; scripts/check_xla.sh builds a venv with it")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DPSNR_XLA_SUMMARY")
    if path and _SUMMARY:
        Path(path).write_text(json.dumps(_SUMMARY, indent=2, sort_keys=True))


@pytest.fixture
def record():
    """record(name, **figures): add one test's measurements to the JSON summary."""

    def _record(name: str, **figures):
        _SUMMARY[name] = figures

    return _record


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
