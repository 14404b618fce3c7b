# One-command setup on a fresh machine: `make demo` (main job) and `make test` (the test suite).
# The CPU build of torch is installed first so that pip never pulls a multi-GB CUDA build here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The +cpu build by name: PyPI has none, so pip takes it from a local wheel where the machine has one, else from
# PyTorch's CPU index; a plain `torch==2.13.0` would be PyPI's Linux wheel, the CUDA build.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# PyTorch's OpenMP threads spin while they wait for work; on cores that other jobs share that slowed
# CPU training up to 15x (docs/training.md). The `egmla` command asks for passive waiting itself; this
# does the same for the test suite. A value in the environment wins.
export OMP_WAIT_POLICY ?= PASSIVE
# Test processes (pytest-xdist): one per core; on CI's two cores the suite takes ~8 min instead of ~16 serially.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto

.PHONY: install demo test test-fast clean

$(BIN)/egmla: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU)" 2>/dev/null \
		|| $(BIN)/python -m pip install -q "$(TORCH_CPU)" --index-url $(TORCH_CPU_INDEX)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/egmla

install: $(BIN)/egmla

# Main job: train the tiny EG-MLA preset on the embedded English corpus (CPU, a few minutes),
# then generate from it and print the KV-cache table.
demo: install
	$(BIN)/egmla train
	$(BIN)/egmla generate --run runs/latest --prompt "ROMEO:" --max-new-tokens 60
	$(BIN)/egmla kv-report --preset paper-base

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
