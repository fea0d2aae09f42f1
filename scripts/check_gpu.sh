#!/usr/bin/env bash
# Check DPSN-R on an NVIDIA GPU: run tests/gpu/ (CUDA against the CPU reference, sparse pool
# updates, cached generation, a memory-mapped pool under a GPU controller, DPSNRTrainer in fp32 and
# bf16 with a resume, torch.compile of the static loop) and print one JSON summary last.
#
# Needs a Python where torch sees CUDA and the project's requirements are importable (the
# project's own .venv holds a CPU torch, so by default this uses `python3`; set PYTHON to choose).
# Usage: scripts/check_gpu.sh [extra pytest arguments]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SUMMARY="$(mktemp)"
trap 'rm -f "$SUMMARY"' EXIT

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "check_gpu.sh: $PY has no CUDA device (torch.cuda.is_available() is False)" >&2
  exit 2
fi

set +e
(
  cd "$ROOT"
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" DPSNR_GPU_SUMMARY="$SUMMARY" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    "$PY" -m pytest -q -p no:cacheprovider tests/gpu "$@" >&2
)
status=$?
set -e

"$PY" - "$SUMMARY" "$status" <<'PYEOF'
import json, sys
import torch, transformers, accelerate
path, status = sys.argv[1], int(sys.argv[2])
try:
    checks = json.load(open(path))
except (OSError, ValueError):
    checks = {}
print(json.dumps({
    "passed": status == 0, "pytest_exit_code": status, "device": torch.cuda.get_device_name(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
    "accelerate": accelerate.__version__, "checks": checks,
}))
PYEOF
exit "$status"
