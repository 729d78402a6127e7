# Both targets work on a fresh machine: they create .venv, install a CPU torch first (so the bare
# `torch` requirement never pulls a multi-GB CUDA build), then the package, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Test dependencies installed without theirs: both require torchvision, whose registry wheel is a CUDA build that
# would replace the CPU torch (siclip/interop/_torchvision_standin lends them a stand-in for its import-time names).
NODEPS ?= timm==1.0.31 open_clip_torch==3.3.0

.PHONY: setup demo test bench blocks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test,augment]'
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

setup: $(VENV)/.installed

## The main job: a MobileCLIP-tiny teacher and its SiCLIP-tiny student (WI + WIKD + PM) on the embedded world
## (CPU, under 10 minutes), evaluated on the same items, one table.
demo: setup
	$(PY) experiments/demo.py

## The block micro-benchmarks as one table (SAS-P against Pre-LN, shaped attention against SDPA).
blocks: setup
	$(PY) benchmarks/blocks_table.py

## The test suite, benchmarks included as one-shot smoke runs: one worker per core (pytest-xdist), each test file
## on one worker so its module fixtures are built once (TEST_WORKERS=0 runs it in this process).
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q --benchmark-disable -n $(TEST_WORKERS) --dist loadfile

## The CPU micro-benchmarks with timing.
bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
