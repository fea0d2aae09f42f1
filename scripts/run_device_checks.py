"""Run one device check suite (tests/gpu or tests/xla) and print one JSON summary as the last line.

    python scripts/run_device_checks.py tests/gpu [extra pytest arguments]

The summary: whether pytest passed, its exit code, the versions that ran (torch, the CUDA device or
torch_xla where present, transformers, accelerate) and what each test measured, which the suite's
conftest writes to $DPSNR_CHECK_SUMMARY (tests/device_checks.py). Exits with pytest's status.
scripts/check_gpu.sh and scripts/check_xla.sh call it once their environment is ready.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    found = {}
    if torch.cuda.is_available():
        found.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    found["torch"] = torch.__version__
    if importlib.util.find_spec("torch_xla") is not None:
        import torch_xla

        found["torch_xla"] = torch_xla.__version__
    found.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
    return found


def main(argv: list[str]) -> int:
    suite, *pytest_args = argv
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        env = dict(os.environ, DPSNR_CHECK_SUMMARY=str(summary), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # pytest's own output goes to stderr: the last line of stdout is the summary alone.
        status = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite, *pytest_args],
                                cwd=ROOT, env=env, stdout=sys.stderr).returncode
        checks = json.loads(summary.read_text()) if summary.is_file() else {}
    print(json.dumps({"passed": status == 0, "pytest_exit_code": status, **versions(), "checks": checks}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
