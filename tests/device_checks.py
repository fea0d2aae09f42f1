"""What the device check suites (tests/gpu, tests/xla) share: their tests are skipped where the device
is missing, and each test can record what it measured into one JSON summary, written at the end of
the session to $DPSNR_CHECK_SUMMARY for scripts/run_device_checks.py to print."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


class DeviceChecks:
    def __init__(self, folder: Path, available: bool, reason: str):
        self.folder, self.available, self.reason = folder, available, reason
        self.summary: dict = {}

    def skip_if_unavailable(self, items) -> None:
        """pytest_collection_modifyitems: skip this folder's tests when the device is missing."""
        if self.available:
            return
        skip = pytest.mark.skip(reason=self.reason)
        for item in items:
            if self.folder in Path(str(item.fspath)).resolve().parents:
                item.add_marker(skip)

    def write_summary(self) -> None:
        """pytest_sessionfinish: the recorded measurements, as JSON."""
        path = os.environ.get("DPSNR_CHECK_SUMMARY")
        if path and self.summary:
            Path(path).write_text(json.dumps(self.summary, indent=2, sort_keys=True))

    def record(self, name: str, **figures) -> None:
        """record(name, **figures): add one test's measurements to the summary."""
        self.summary[name] = figures
