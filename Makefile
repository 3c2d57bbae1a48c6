# Two commands do all the setup on a fresh machine: `make study` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
STUDY_CONFIG ?= config.yaml
# Every pip call is constrained to torch 2.13.0 (requirements/constraints.txt): otherwise pip resolves torch
# again. PyPI's Linux x86_64 wheel of it is a CUDA 13 build; a machine with the CPU wheel on its find-links
# path takes that one. TORCH_INDEX=URL installs torch from that index first (PyTorch's index for another
# CUDA version, docs/cluster.md); the constraint then keeps it.
TORCH_INDEX ?=
PIP := PIP_CONSTRAINT=$(CURDIR)/requirements/constraints.txt DS_BUILD_OPS=0 $(BIN)/python -m pip
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup study report test test-reports test-slurm test-gpu check-cuda lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/lock.txt requirements/constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) install -q --index-url $(TORCH_INDEX) -r requirements/constraints.txt)
	$(PIP) install -q -r requirements/lock.txt
	$(PIP) install -q --no-deps -e .
	touch $@

study: setup
	$(BIN)/snakemake --cores $(CORES) --configfile $(STUDY_CONFIG)
	$(MAKE) report

report: setup
	$(BIN)/snakemake --cores 1 --configfile $(STUDY_CONFIG) --report \
	  report/$$($(BIN)/python -c "import yaml,sys; print(yaml.safe_load(open('$(STUDY_CONFIG)')).get('study','tiny-cpu'))")/snakemake-report.html

# The suite in TEST_WORKERS pytest-xdist worker processes (0: in this process), by the work units of
# tests/conftest.py: its launches are CPU-bound, so more workers than cores gain nothing.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# Every committed study's report rebuilt from its runs and read in headless Chromium at 1280 px
# (tests/test_report.py, marker report; Debian's chromium, installed by the test where missing).
test-reports: setup
	$(BIN)/python -m pytest -q -m report tests/test_report.py

# A real Slurm cluster on this machine (root, apt, loopback only; scripts/slurm/), the study through
# `snakemake --profile slurm` on it (tests/slurm, marker slurm), and the cluster torn down again
# whatever happened. LLMPAR_SLURM_BASE (default /tmp/llmpar-slurm) holds the cluster's state.
test-slurm: setup
	trap 'bash scripts/slurm/teardown-local-cluster.sh' EXIT; \
	bash scripts/slurm/setup-local-cluster.sh && \
	$(BIN)/python -m pytest -q -rA -m slurm tests/slurm

# Every strategy and engine on 2 CUDA GPUs against `single` (tests/gpu, marker gpu; one launch per process
# layout, 7 minutes on 2 x H100). GPU_PYTHON is a Python whose torch has CUDA (the venv's is the CPU
# build): e.g. `make test-gpu GPU_PYTHON=python3` on a GPU host, or `python scripts/offline.py test-gpu` there,
# which names the output by card and writes the versions beside it.
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
	  $(GPU_PYTHON) -m pytest -q -rA -m gpu tests/gpu --durations=0

# torch's version, the CUDA it was built for and the GPUs it sees; fails where CUDA is unavailable (a CPU
# build, or no GPU or driver on this machine).
check-cuda: setup
	$(BIN)/python -c "import torch; gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]; \
	  print('torch', torch.__version__, 'built for CUDA', torch.version.cuda, 'GPUs', gpus); \
	  raise SystemExit(0 if torch.cuda.is_available() else 'torch.cuda.is_available() is False')"

# ruff, snakefmt, Snakemake's linter, and the package's layers (docs/architecture.md: no upward import,
# no import cycle)
lint: setup
	$(BIN)/ruff check src scripts tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --cores 1

clean:
	rm -rf results/tiny-cpu report/tiny-cpu logs .snakemake
