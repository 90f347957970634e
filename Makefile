# Two entry points for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pretrain_jax.py +experiment=quick_test

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/compile_time.py
	$(BIN)/python bench/sudoku_build.py
	$(BIN)/python bench/sampler.py

clean:
	rm -rf $(VENV) build *.egg-info
