# make test   - set up .venv (CPU torch, triton, test tools), build, install, run the tests
# make demo   - the main job: a GPT trained with dp2 x tp2 x pp2 on 8 processes, the same on one (float64), verdict
# make bench  - the whole benchmark suite
# make cuda-build - build the CUDA extension in .venv-cuda (CUDA torch) and test it on the CPU
# make gpu-check  - on a GPU machine: install into its python, GPU tests, benchmarks

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
MAX_JOBS ?= 2
# The toolkit that holds nvcc (PATH's nvcc may be a wrapper script elsewhere).
CUDA_HOME ?= $(firstword $(patsubst %/bin/nvcc,%,$(wildcard /usr/local/cuda/bin/nvcc \
	$(realpath $(dir $(shell command -v nvcc 2>/dev/null))/..)/bin/nvcc)))
DEPS = triton ninja numpy setuptools wheel pytest pytest-timeout transformers expecttest
PYTEST_ARGS ?=

export MAX_JOBS
SHELL := /bin/bash

.PHONY: test demo bench install cuda-build gpu-check clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)" $(DEPS)
	touch $@

# Editable install: _C is built in place against the venv's torch; ninja rebuilds only what changed.
install: $(VENV)/.deps
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# A small GPT on the bundled text: dp2 x tp2 (sequence parallel) x pp2 on 8 CPU processes, then
# the same model and batches on one process, both in float64, and the verdict on the losses.
# In float64 the summation order alone moves them by about 1e-12 over 30 steps and a real error
# by orders more, so the verdict's tolerance is derived from float64's rounding
# (hybridpar_ext/train/compare.py), not sampled from a re-run.
DEMO_DIR = build/demo
DEMO_FLAGS = --layers 4 --hidden 128 --heads 4 --kv-heads 2 --seq 64 --global-batch 16 --steps 30 --lr 1e-3 \
	--dtype float64
DEMO_PY = $(abspath $(VENV))/bin/python -m hybridpar_ext

demo: install
	$(VENV)/bin/python -m hybridpar_ext info
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && $(DEMO_PY) train --dp 2 --tp 2 --pp 2 --sp --microbatches 4 $(DEMO_FLAGS) --metrics-file hybrid.jsonl
	cd $(DEMO_DIR) && $(DEMO_PY) train $(DEMO_FLAGS) --quiet --metrics-file one.jsonl
	cd $(DEMO_DIR) && $(DEMO_PY) compare-runs hybrid.jsonl one.jsonl

bench: install
	$(VENV)/bin/python -m bench all

$(CUDA_VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH)" $(DEPS)
	touch $@

# A real CUDA build (nvcc compiles and links the .cu sources) on a machine without a GPU.
# It is installed as a regular (non-editable) package with its own build directory, and
# the tests import it from site-packages, so it never mixes with the CPU build in the tree.
cuda-build: $(CUDA_VENV)/.deps
	@test -n "$(CUDA_HOME)" || { echo "cuda-build: nvcc not found; set CUDA_HOME"; exit 1; }
	CUDA_HOME=$(CUDA_HOME) HYBRIDPAR_FORCE_CUDA=1 HYBRIDPAR_BUILD_DIR=build/cuda \
		$(CUDA_VENV)/bin/pip install -q --no-build-isolation --no-deps --force-reinstall .
	cd /tmp && $(abspath $(CUDA_VENV))/bin/python -m hybridpar_ext info
	cd /tmp && $(abspath $(CUDA_VENV))/bin/python -c "import hybridpar_ext; \
		info = hybridpar_ext.build_info(); assert info['cuda'], info; print('CUDA build OK:', info)"
	$(CUDA_VENV)/bin/pytest $(PYTEST_ARGS)

# On a GPU machine (no network; its own torch and triton): one command does it all, inside
# one 10-minute call. Only the tests that run on CUDA (the kernels compiled for real in fp16,
# bf16 and fp32 against the float64 reference, the CUDA extension, NCCL, the trainer on NCCL,
# torch.compile on CUDA): Triton's interpreter has nothing to add there. Each part has a time
# budget and stops (SIGINT: pytest prints its summary, a bench keeps the rows it printed) rather
# than taking the call down; the logs land in bench/results; the exit status
# is the first failure's.
GPU_TEST_BUDGET_S ?= 240
GPU_BENCH_BUDGET_S ?= 60
GPU_BENCH ?= norms attention comm
GPU_BENCH_ARGS ?= --quick
gpu-check:
	MAX_JOBS=16 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) -m hybridpar_ext info
	$(PYTHON) -c "import hybridpar_ext; info = hybridpar_ext.build_info(); assert info['cuda'], info"
	mkdir -p bench/results && rm -f bench/results/gpu-bench.log
	status=0; \
	xdist=$$($(PYTHON) -c "import xdist" 2>/dev/null && echo "-n 8"); \
	set -o pipefail; timeout -s INT -k 30 $(GPU_TEST_BUDGET_S) $(PYTHON) -m pytest -q --gpu-only $$xdist \
		$(PYTEST_ARGS) 2>&1 | tee bench/results/gpu-tests.log || status=$$?; \
	for family in $(GPU_BENCH); do \
		timeout -s INT -k 15 $(GPU_BENCH_BUDGET_S) $(PYTHON) -m bench $$family $(GPU_BENCH_ARGS) 2>&1 | \
			tee -a bench/results/gpu-bench.log || \
			{ s=$$?; echo "gpu-check: bench $$family exited $$s"; [ $$status -ne 0 ] || status=$$s; }; \
	done; \
	exit $$status

clean:
	rm -rf build dist *.egg-info hybridpar_ext/_C*.so
