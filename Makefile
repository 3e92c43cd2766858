# Two entry points: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/iuq: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/iuq

demo: $(BIN)/iuq
	$(BIN)/iuq train configs/demo.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(BIN)/iuq
	$(BIN)/python -m pytest -q

lint: $(BIN)/iuq
	$(BIN)/ruff check iuq tests benchmarks
