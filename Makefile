# make test : create .venv with pinned dependencies, build the extension, run the test suite
# make demo : same setup, then DLRM with TT tables on 2 CPU ranks (examples/dlrm)
# make bench: the CPU op benchmark (writes out/bench_cpu.json)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# fbgemm_gpu 1.8.0 is the one that loads against torch 2.13; the CUDA build only where a GPU is.
FBGEMM := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo fbgemm-gpu==1.8.0 || echo fbgemm-gpu-cpu==1.8.0)
THREADS ?= 2

.PHONY: test demo bench build clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip "setuptools>=70" wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(FBGEMM) -r requirements.txt
	$(PIP) install -q --no-deps torchrec==1.8.0
	touch $@

build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation -e .

test: build
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

# DLRM with TT tables on 2 CPU ranks (synthetic Criteo-shaped data, tables at 1/10 Kaggle size):
# prints the plan and a summary, writes out/dlrm_demo/curve.png. The single-table demo is
# examples/demo_tt_table.py.
demo: build
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m torch.distributed.run --nproc_per_node 2 examples/dlrm/train.py --scale-tables 0.1 --steps 1000 \
		--tt-cache-fraction 0.002 --tt-cache-refresh 250 --threads 1 --out out/dlrm_demo

bench: build
	mkdir -p out
	$(PY) examples/benchmark_tt_embedding.py --threads $(THREADS) --json out/bench_cpu.json

clean:
	rm -rf build *.egg-info torchrec_tt/*.so $(VENV)
