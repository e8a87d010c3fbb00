# Two commands do all the set-up on a fresh machine:
#   make demo   - the SiT example's CPU demo (baseline vs ANM on sinusoid images)
#   make test   - the test suite (fast; `make test-slow` runs the slow tests too)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine: make TORCH="torch" ...
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test test-slow demo lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,examples,eval]"
	touch $@

$(VENV)/.examples: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
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
