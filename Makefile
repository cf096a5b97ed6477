# Two commands for a fresh machine: `make demo` and `make test`.
# torch 2.13.0 is installed first: pinned, it is a small CPU wheel; unpinned, pip pulls a
# multi-GB CUDA build. GPU users: install your own torch build into .venv first (README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsim-installed

.PHONY: demo test test-slow test-all bench peers-venv peers clean

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

# pfl-research for benchmarks/peers.py, in a venv of its own: pfl 0.6.0 pins dp-accounting < 0.6,
# fedsim needs >= 0.6 (the pin is the [peers] extra of pyproject.toml). pfl wants Python < 3.13;
# torch first, as above, so that pip keeps the small CPU wheel.
PFL_PYTHON ?= python3.11
PFL_VENV := .pflvenv
PFL_STAMP := $(PFL_VENV)/.pfl-installed

$(PFL_STAMP):
	test -d $(PFL_VENV) || $(PFL_PYTHON) -m venv $(PFL_VENV)
	$(PFL_VENV)/bin/pip install -q torch==2.13.0
	$(PFL_VENV)/bin/pip install -q pfl==0.6.0 numpy
	touch $(PFL_STAMP)

peers-venv: $(PFL_STAMP)

peers: $(STAMP) $(PFL_STAMP)
	$(BIN)/python benchmarks/peers.py --quick --pfl-python $(PFL_VENV)/bin/python

clean:
	rm -rf $(VENV) $(PFL_VENV) runs sweeps
