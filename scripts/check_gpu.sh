#!/usr/bin/env bash
# Check DPSN-R on an NVIDIA GPU: run tests/gpu/ (CUDA against the CPU reference, sparse pool
# updates, cached generation, a memory-mapped pool under a GPU controller, DPSNRTrainer in fp32 and
# bf16 with a resume, torch.compile of the static loop) and print one JSON summary last.
#
# Needs a Python where torch sees CUDA and the project's requirements are importable (the
# project's own .venv holds a CPU torch, so by default this uses `python3`; set PYTHON to choose).
# Then the throughput benchmark on the GPU (DPSN-R vs its dense twin and the pool-size sweep, the
# same `dpsnr bench-throughput` the CPU figures come from, eager and with compiled decoding) and a profile of a training step and of
# decoding (`dpsnr profile-step`), written to eval/results/gpu/.
# Usage: scripts/check_gpu.sh [extra pytest arguments]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "check_gpu.sh: $PY has no CUDA device (torch.cuda.is_available() is False)" >&2
  exit 2
fi

status=0
"$PY" "$ROOT/scripts/run_device_checks.py" tests/gpu "$@" || status=$?
(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
  "$PY" -m dpsnr.eval.bench_throughput --device cuda --batch 32 --block 256 --repeats 3 \
  --output eval/results/gpu/bench_throughput.json) || status=$?
# decoding compiled on both sides (static KV cache; transformers' CUDA path, with CUDA graphs)
(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
  "$PY" -m dpsnr.eval.bench_throughput --device cuda --batch 32 --block 256 --repeats 3 --sizes 14 20 \
  --compile-decode --output eval/results/gpu/bench_throughput_compiled_decode.json) || status=$?
(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
  "$PY" -m dpsnr.eval.profile_step --device cuda --batch 32 --block 256 \
  --output eval/results/gpu/profile_step.txt) || status=$?
exit $status
