# Quick start: `make demo` (whole chain on synthetic data) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-slurm-slow lint install clean gpu-wheels gpu-check-dry

$(BIN)/steel: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/steel

demo: $(BIN)/steel
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/steel demo

# The default suite on up to 4 pytest-xdist workers (one a core; a test file stays on one worker, so its
# module fixtures are built once; files start longest first, see tests/conftest.py): TEST_WORKERS=1 runs it in
# one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(BIN)/steel
	WANDB_MODE=offline $(BIN)/python -m pytest -q --durations=10 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The slow test of the real SLURM cluster (time-limit requeue: SLURM's limits are whole minutes); CI runs it
# after `make test` (.ci/run), with the cluster of .ci/slurm.sh.
test-slurm-slow: $(BIN)/steel
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m slow tests/test_slurm.py

lint: $(BIN)/steel
	$(BIN)/ruff check steel tests benchmarks
	$(BIN)/ruff format --check steel tests benchmarks

clean:
	rm -rf demo-out runs wandb

# Wheels a lent GPU machine lacks (CPython 3.12, manylinux x86_64) -> .gpu-wheels/ (git-ignored), for
# benchmarks/gpu_check.sh there. Needs only pip and the registry.
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
gpu-wheels:
	mkdir -p .gpu-wheels
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .gpu-wheels -r benchmarks/gpu-wheels.txt
	du -sh .gpu-wheels

gpu-check-dry: $(BIN)/steel
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --cpu-dry-run
