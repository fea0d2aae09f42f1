#!/usr/bin/env bash
# Check that DPSN-R trains on XLA, on any Linux x86-64 machine (no TPU needed).
#
# Builds an isolated virtualenv with torch==2.9.0 and torch_xla==2.9.0 (the newest torch_xla; it
# needs exactly that torch: ~4 GB of wheels, as torch 2.9.0 from PyPI brings its CUDA libraries),
# plus the transformers / accelerate versions of the project's own venv (.venv) when there is one,
# else the ranges of setup.cfg. Then runs tests/xla/ on torch_xla's CPU client (PJRT_DEVICE=CPU):
# a few training steps of the `debug` preset through a plain loop, accelerate and DPSNRTrainer,
# asserting that nothing but `aten::_local_scalar_dense` falls back to the CPU and that the compile
# count stops growing; and the pool rows sharded over an SPMD mesh of 4 virtual devices
# (CPU_NUM_DEVICES=4) against the unsharded model. Prints one JSON summary as the last line.
#
# Usage: scripts/check_xla.sh                 (venv in $XLA_VENV, default ~/.cache/dpsnr/xla-venv)
#        XLA_VENV=/path/to/venv scripts/check_xla.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XLA_VENV:-$HOME/.cache/dpsnr/xla-venv}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.9.0"
XLA_PIN="torch_xla==2.9.0"

# The project's versions of the Hugging Face stack: pinned from .venv if it exists.
if [ -x "$ROOT/.venv/bin/python" ]; then
  HF_PINS="$("$ROOT/.venv/bin/python" - <<'EOF'
import importlib.metadata as md
names = ("transformers", "accelerate", "safetensors", "tokenizers", "datasets", "huggingface_hub")
print(" ".join(f"{n}=={md.version(n)}" for n in names))
EOF
)"
else
  HF_PINS="transformers>=5.23,<6 accelerate>=1.10,<2 safetensors>=0.4 tokenizers>=0.21 datasets>=4,<6"
fi

if ! "$VENV/bin/python" -c "import torch, torch_xla; assert torch.__version__.startswith('2.9.0') and torch_xla.__version__.startswith('2.9.0')" 2>/dev/null; then
  echo "building $VENV (torch 2.9.0 + torch_xla 2.9.0, ~4 GB) ..." >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_PIN" "$XLA_PIN"
fi
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINTS"  # nothing below may replace the torch that torch_xla needs
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" $HF_PINS pyyaml "pytest>=8" "pytest-timeout>=2"

PJRT_DEVICE=CPU "$VENV/bin/python" "$ROOT/scripts/run_device_checks.py" tests/xla "$@"
