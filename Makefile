# Two commands set everything up on a fresh machine:
#   make demo   install, then run the whole pipeline on the embedded sample shop
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel goes in first so nothing later pulls the multi-GB CUDA build; on a GPU machine
# set TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench-ingest bench-train bench-serve bench-recommend clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m jobs.demo --config jobs/configs/demo.yaml

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check recsys jobs serve tests bench

bench-ingest: install
	$(PY) -m bench.ingest

bench-train: install
	$(PY) -m bench.train_overhead

bench-serve: install
	$(PY) -m bench.serve_load

bench-recommend: install
	$(PY) -m bench.recommend_throughput

clean:
	rm -rf runs .pytest_cache
