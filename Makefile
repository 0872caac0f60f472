# Two entry points: `make run` (set up, then one default gam-rl run) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

# torch is pinned to the local CPU build first, so pip never pulls a multi-GB CUDA wheel
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/gam-rl $(ARGS)

lint: setup
	$(BIN)/ruff check .

test: setup lint
	WANDB_MODE=offline $(BIN)/python -m pytest -q

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
