# Two commands do all the set-up on a fresh machine:
#   make demo   - the SiT example's CPU demo (baseline vs ANM on sinusoid images)
#   make test   - the test suite (fast; `make test-slow` runs the slow tests too)
# and one more checks the library on any torch release:
#   make test-torch TORCH=2.4.1   - the library's fast tests (not tests/sit) in .venv-torch-2.4.1
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

.PHONY: test test-slow test-torch demo lint bench clean

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

# test-torch: a venv per torch release with torch, the library and the `test` extra only, so tests that
# need an optional package (transformers, diffusers, the examples' einops ...) skip, naming it. The
# requested torch is pinned with a constraint file of its own, given to pip as PIP_CONSTRAINT, which
# replaces any constraint file pip is configured with: a site cap (torch<=2.14.1) cannot swap the
# version. CI is unset for pytest: in CI the doc recipes of absent extras would fail instead of skipping.
TORCH_VERSION = $(patsubst torch==%,%,$(TORCH))

.venv-torch-%/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-torch-$*
	echo "torch==$*" > .venv-torch-$*/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/.venv-torch-$*/constraints.txt .venv-torch-$*/bin/python -m pip install -q \
		$(TORCH_PIP_ARGS) "torch==$*" -e ".[test]"
	touch $@

test-torch: .venv-torch-$(TORCH_VERSION)/.installed
	env -u CI .venv-torch-$(TORCH_VERSION)/bin/python -m pytest --ignore=tests/sit

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m "slow or not slow"

demo: $(VENV)/.examples
	$(BIN)/python examples/sit/demo.py $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check anm tests examples benchmarks

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .venv-torch-* demo_out .pytest_cache
