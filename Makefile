# medcli: developer and user entry points.
#   make install   a .venv in the repo with medcli (editable), dev tools and the example plugin
#   make test      the whole test suite, slow end-to-end tests included (what CI runs)
#   make demo      the main job end to end on a synthetic cohort
#   make bench     speed and memory figures for this machine
#
# PyTorch: where no NVIDIA GPU is present we install the CPU build (torch==2.13.0; a plain `torch`
# requirement pulls a multi-GB CUDA build).  Override for your machine, e.g.
#   make install TORCH_SPEC='torch==2.5.1' TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cu124'
#   make install TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.2
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.medcli-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[dev]'
	for p in plugins/*/; do [ -f $$p/pyproject.toml ] && $(BIN)/python -m pip install -q -e $$p || true; done
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check medcli tests plugins scripts
	$(BIN)/ruff format --check medcli tests plugins scripts

demo: install
	bash scripts/demo.sh

bench: install
	$(BIN)/medcli bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info demo bench-out
