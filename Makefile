# Two commands for a fresh machine: `make demo` and `make test`.
# torch 2.13.0 is installed first: pinned, it is a small CPU wheel; unpinned, pip pulls a
# multi-GB CUDA build. GPU users: install your own torch build into .venv first (README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsim-installed

.PHONY: demo test test-slow test-all bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,text,tensorboard,mlflow]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsim run configs/quickstart.toml

test: $(STAMP)
	$(BIN)/ruff check fedsim clients strategies tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# the cases `make test` leaves out (-m slow): every algorithm's kill-and-resume under both
# engines, the long fuzz, the wheel, deployments, engine utility over seeds
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_speed.py --quick
	$(BIN)/python benchmarks/runtime_overhead.py
	$(BIN)/python benchmarks/fedld_aggregation.py

clean:
	rm -rf $(VENV) runs sweeps
