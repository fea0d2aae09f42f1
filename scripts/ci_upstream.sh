#!/usr/bin/env bash
# CI against transformers releases other than the locked one (constraints.txt).
#
#   scripts/ci_upstream.sh newest   newest transformers / accelerate / datasets / tokenizers /
#                                   safetensors / huggingface_hub from the registry, unpinned: an
#                                   upstream release that breaks us turns CI red the day it ships;
#                                   on torch 2.14.1, the newest torch these machines hold on disk
#                                   (PyPI's 2.15 is a CUDA build of several GB; where pip is capped at
#                                   the torch on disk: PIP_CONSTRAINT=/dev/null TORCH=torch==2.15.0)
#   scripts/ci_upstream.sh floor    the oldest releases setup.cfg admits (transformers 5.23.0):
#                                   remote code runs on whatever 5.x a Hub user has
#
# Each job builds its own venv (.venv-<job>, torch first so nothing pulls other torch wheels),
# installs the package without its pins, and runs the tests that touch the transformers API: model,
# generation, cache, storage / remote code, training with the Trainer and the private Trainer hooks
# DPSNRTrainer overrides (tests/test_trainer_hooks.py). Prints the versions it tested.
set -euo pipefail
cd "$(dirname "$0")/.."
JOB=${1:?usage: scripts/ci_upstream.sh newest|floor}
PY=${PY:-python3}
VENV=.venv-$JOB
case "$JOB" in
  newest) TORCH=${TORCH:-torch==2.14.1}
          UPSTREAM=(-U transformers accelerate datasets tokenizers safetensors huggingface_hub) ;;
  floor)  TORCH=${TORCH:-torch==2.13.0}
          UPSTREAM=(transformers==5.23.0 "accelerate>=1.10,<2" "datasets>=4,<6" tokenizers safetensors huggingface_hub) ;;
  *) echo "unknown job $JOB (newest|floor)" >&2; exit 2 ;;
esac
TESTS=(tests/test_modeling.py tests/test_reasoning.py tests/test_storage.py tests/test_config.py tests/test_training.py
       tests/test_trainer_hooks.py
       tests/test_pool.py tests/test_coordinate.py)
[ -f tests/test_export.py ] && TESTS+=(tests/test_export.py)
[ -f tests/test_offload.py ] && TESTS+=(tests/test_offload.py)
# retrofitting wraps transformers' own Llama layers: the first thing an upstream refactor breaks
TESTS+=(tests/test_hashed_memory.py tests/test_retrofit.py)

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q "${UPSTREAM[@]}" pyyaml jinja2 numpy pytest pytest-timeout
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
print("ci_upstream versions:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "huggingface_hub")))
PYEOF
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
