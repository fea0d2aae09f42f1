# Everything a fresh machine needs. torch==2.13.0 (CPU) goes in first: a bare or ranged torch
# requirement with no torch installed would pull several GB of CUDA wheels.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# The test command of the README (and of .ci/run).
test: venv
	$(BIN)/python -m pytest -q

# The main job: train `micro` on the bundled TinyStories data (~10 min on 2 CPU cores), report the
# held-out loss, save a loadable model folder in runs/micro-tinystories and print a sample story.
demo: venv
	$(BIN)/python -m training.train --config configuration/recipes/micro-tinystories.yaml

clean:
	rm -rf $(VENV) build *.egg-info
