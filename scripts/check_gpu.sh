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

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "check_gpu.sh: $PY has no CUDA device (torch.cuda.is_available() is False)" >&2
  exit 2
fi

"$PY" "$ROOT/scripts/run_device_checks.py" tests/gpu "$@"
