# `make test` and `make demo` set everything up on a fresh machine, then test or run the demo.
# CUDA users: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Test files run in this many processes (pytest-xdist; each file stays in one, so a module's fixtures
# and its two-process launches stay together); 0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test test-slow demo benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PYTEST)

test-slow: install
	$(PYTEST) --run-slow

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/amnesia-sd demo --output-dir demo-output --overwrite

benchmark: install
	cd benchmarks && HF_HUB_OFFLINE=1 ../$(BIN)/python fisher.py && HF_HUB_OFFLINE=1 ../$(BIN)/python step.py && HF_HUB_OFFLINE=1 ../$(BIN)/python gpu_sd14.py

clean:
	rm -rf $(VENV) .pytest_cache demo-output
