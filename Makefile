# Two entry points for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test faults bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The embedded default: the `demo` experiment group (2 tiny runs on generated easy Sudoku) through
# the batch runner, on CPU, with no TPU, GCS or W&B account. Re-running skips finished runs.
demo: $(STAMP)
	$(BIN)/kellen generate demo
	$(BIN)/python kellen/experiments/run_experiment_batch.py --pattern 'demo_*'
	$(BIN)/kellen status 'demo_*'
	$(BIN)/kellen compare demo
	$(BIN)/kellen guide demo
	@echo "run records, summary.json and plots/: runs/demo/<run>/ | comparison table and plots: reports/demo/ | guide: kellen/experiments/guides/demo.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Only the fault-injection scenarios (also part of `make test`); ends with their summary table.
faults: $(STAMP)
	$(BIN)/python -m pytest -q -m fault tests

bench: $(STAMP)
	$(BIN)/python bench/compile_time.py
	$(BIN)/python bench/sudoku_build.py
	$(BIN)/python bench/sampler.py

clean:
	rm -rf $(VENV) build *.egg-info
