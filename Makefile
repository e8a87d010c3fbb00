# Two commands do all the set-up on a fresh machine:
#   make demo   - the SiT example's CPU demo (baseline vs ANM on sinusoid images)
#   make test   - the test suite (fast; `make test-slow` runs the slow tests too)
PYTHON ?= python3
VENV ?= .venv
# The torch to install, from pip's configured index (CI tests torch 2.13.0 on CPU). Which build that is
# depends on the index: on PyPI, torch==2.13.0 for Linux x86-64 is the CUDA build, with NVIDIA's libraries
# as extra wheels. For the CPU build on Linux: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Another version: make test TORCH="torch>=2.4"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
BIN := $(VENV)/bin

.PHONY: test test-slow demo lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,examples,eval,integrations]"
	touch $@

$(VENV)/.examples: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[examples]"
	touch $@

test: $(VENV)/.dev
	$(BIN)/ruff check anm tests examples benchmarks
	$(BIN)/python -m pytest

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m "slow or not slow"

demo: $(VENV)/.examples
	$(BIN)/python examples/sit/demo.py $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check anm tests examples benchmarks

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
