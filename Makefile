# Quick start: `make demo` (whole chain on synthetic data) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/steel: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/steel

demo: $(BIN)/steel
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/steel demo

test: $(BIN)/steel
	WANDB_MODE=offline $(BIN)/python -m pytest -q

lint: $(BIN)/steel
	$(BIN)/ruff check steel tests benchmarks
	$(BIN)/ruff format --check steel tests benchmarks

clean:
	rm -rf demo-out runs wandb
