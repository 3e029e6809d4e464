# Two commands for a fresh clone: `make demo` (the main job) and `make test` (the whole suite).
# Both create or reuse .venv, installed from this repository with constraints.txt (CPU torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-patterns fit --recipe fashion_mnist

# Side-by-side benchmarks (peers installed into benchmarks/.venv-bench, never into .venv); about 15 minutes.
bench:
	bash benchmarks/run_all.sh

lint: $(STAMP)
	$(BIN)/ruff check lightning_patterns tests examples $(wildcard benchmarks)
	$(BIN)/ruff format --check lightning_patterns tests examples $(wildcard benchmarks)
	$(BIN)/mypy

test: lint
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
