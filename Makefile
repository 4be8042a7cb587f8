# detr_explained: the two commands a newcomer runs are `make demo` and `make test`.
# Both create .venv on first use (pinned torch/torchvision from this machine's local wheels,
# then the package with its dev tools) and reuse it afterwards.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# On a small, busy CPU, OpenMP threads that spin while waiting for a descheduled partner make
# every parallel op slow: let them sleep instead.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test export-check nbtest pytest nbtest-slow docs bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

## The main job: synthetic dataset -> train -> evaluate -> pictures under runs/demo, AP printed.
demo: setup
	$(BIN)/detr-explained demo --out runs/demo

## Every test: the library is in sync with the notebooks, the notebooks run, the site builds, then pytest.
test: setup export-check nbtest docs pytest

export-check: setup
	@tmp=$$(mktemp -d); cp -r detr_explained $$tmp/; \
	$(BIN)/nbdev-export; \
	if diff -r -q -x __pycache__ $$tmp/detr_explained detr_explained; then echo "nbdev-export: detr_explained/ is in sync with nbs/"; \
	else echo "nbdev-export changed detr_explained/: the library was out of sync with nbs/ (commit the exported files)"; rm -rf $$tmp; exit 1; fi; \
	rm -rf $$tmp

nbtest: setup
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --timing

nbtest-slow: setup
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --flags slow --timing

pytest: setup
	$(BIN)/python -m pytest -q -rs tests

## The course website: every notebook executed, rendered to docs/_build/html (MathJax served locally).
docs: setup
	OMP_NUM_THREADS=1 $(BIN)/python docs/build.py

bench: setup
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs _proc _docs .pytest_cache docs/_build
