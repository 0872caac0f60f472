# Two entry points: `make run` (set up, then one real Table 1 cell in about 4 minutes on 2 cores)
# and `make test`. `make run ARGS="..."` runs gam-rl with other overrides instead.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?= motif=10001011111000 features=1001111 dataset_size=5000 seed=1234 method=distill

.PHONY: setup run test test-slow lint bench clean

setup: $(VENV)/.installed

# torch is pinned and installed first, from TORCH_INDEX when set: pip's configured index serves a CPU
# build on this project's machines; the public index serves Linux a CUDA build (several GB), so on a
# machine without a GPU say TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev,tune]"
	touch $@

run: setup
	$(BIN)/gam-rl $(ARGS)

lint: setup
	$(BIN)/ruff check .

# the tests run in TEST_WORKERS processes (pytest-xdist), one torch thread each (tests/conftest.py): one per
# core of the 2-core machines this project is timed on; TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= 2
PYTEST = WANDB_MODE=offline $(BIN)/python -m pytest -q -n $(TEST_WORKERS)
test: setup lint
	$(PYTEST)

# the long checks outside make test's 5-minute budget (every seed of the twist learners, the launchers and
# scripts end to end, the benchmark, the allocator): CI runs them after make test
test-slow: setup
	$(PYTEST) -m slow

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
