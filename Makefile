# Everything a fresh machine needs, at the exact versions CI tested (constraints.txt, written by
# scripts/lock_deps.sh). torch==2.13.0 (CPU) goes in first: a bare or ranged torch requirement with
# no torch installed would pull several GB of CUDA wheels.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-upstream demo clean

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==26.3
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# The test command of the README (and of .ci/run).
test: venv
	$(BIN)/python -m pytest -q

# The main job: train `micro` on the bundled TinyStories data (~20 min on 2 shared CPU cores), report the
# held-out loss, save a loadable model folder in runs/micro-tinystories and print a sample story.
demo: venv
	$(BIN)/dpsnr train --config configuration/recipes/micro-tinystories.yaml

# CI's other two jobs: newest upstream releases, and the oldest transformers we admit.
test-upstream:
	scripts/ci_upstream.sh newest
	scripts/ci_upstream.sh floor

clean:
	rm -rf $(VENV) .venv-newest .venv-floor build *.egg-info
