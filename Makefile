# detr_explained: the two commands a newcomer runs are `make demo` and `make test`.
# Both create .venv on first use (pinned torch/torchvision from this machine's local wheels,
# then the package with its dev tools) and reuse it afterwards.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# On a small, busy CPU, OpenMP threads that spin while waiting for a descheduled partner make
# every parallel op slow: let them sleep instead (the tests, the notebooks, the docs build).
# The demo chooses for itself by the machine's load (detr_explained.core.configure_threads: on a
# quiet machine a short spin trains 1.4x faster), unless you set OMP_WAIT_POLICY yourself.
USER_OMP_WAIT_POLICY := $(OMP_WAIT_POLICY)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test export-check nbtest nbtest-no-shared pytest nbtest-slow docs docs-test lint lab bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

## The main job: synthetic dataset -> train -> evaluate -> pictures under runs/demo, AP printed.
demo: setup
	$(if $(USER_OMP_WAIT_POLICY),,env -u OMP_WAIT_POLICY )$(BIN)/detr-explained demo --out runs/demo

## Every test: the library is in sync with the notebooks, every notebook runs once (as nbdev-test runs it,
## inside the docs build, which renders those executed notebooks), the site builds, then pytest.
test: setup export-check lint docs-test pytest

## nbdev-export into a temporary copy of nbs/, pyproject.toml and the library, then diff with the library here:
## fails when nbdev-export fails or the committed library differs from the notebooks; the working tree is never written.
export-check: setup
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cp -r nbs pyproject.toml $$tmp/ && cp -r detr_explained $$tmp/ && rm -rf $$tmp/detr_explained/__pycache__ || exit 1; \
	if ! (cd $$tmp && $(abspath $(BIN))/nbdev-export); then echo "export-check: nbdev-export failed (see above)" >&2; exit 1; fi; \
	if diff -r -u -x __pycache__ detr_explained $$tmp/detr_explained >$$tmp/diff; then echo "export-check: detr_explained/ is in sync with nbs/"; \
	else head -c 20000 $$tmp/diff; echo "export-check: detr_explained/ differs from what nbs/ export (diff above: -committed +exported); run nbdev-export and commit" >&2; exit 1; fi

## Plain nbdev-test (the same cells that `make test` runs in the docs build).
nbtest: setup
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --timing

## The notebooks as a reader who cloned only the repository runs them: no ../shared (DETR_EXPLAINED_SHARED points
## to a folder that does not exist), an empty download cache, and no network (every proxy is a closed local port;
## 127.0.0.1 stays reachable for the notebooks' own local test servers).
nbtest-no-shared: setup
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	env -u DETR_EXPLAINED_REQUIRE_SHARED DETR_EXPLAINED_SHARED=$$tmp/no-shared DETR_EXPLAINED_CACHE=$$tmp/cache \
	  XDG_CACHE_HOME=$$tmp/xdg-cache http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
	  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 no_proxy=127.0.0.1,localhost \
	  NO_PROXY=127.0.0.1,localhost OMP_NUM_THREADS=1 \
	  $(BIN)/nbdev-test --n-workers 2 --timing

nbtest-slow: setup
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --flags slow --timing

## Unused imports and lines over 120 characters in the library and the tests (ruff, config in pyproject.toml).
lint: setup
	$(BIN)/ruff check --select F401 detr_explained tests
	@n=$$($(BIN)/ruff check --select E501 --exit-zero --output-format concise detr_explained tests | grep -c E501 || true); \
	  echo "ruff: $$n line(s) over 120 characters (reported, not yet failing: see README, Development)"

pytest: setup
	$(BIN)/python -m pytest -q -rs tests

## The course website: every notebook executed, rendered to docs/_build/html (MathJax served locally).
## `make docs` re-executes only the notebooks that changed; `make docs-test` (in `make test`) executes them all
## and fails, naming each notebook that failed, when one does.
docs: setup
	OMP_NUM_THREADS=1 $(BIN)/python docs/build.py

docs-test: setup
	OMP_NUM_THREADS=1 $(BIN)/python docs/build.py --no-cache

## JupyterLab on the course: the kernel `detr-explained` (this venv, registered in it) named by every notebook,
## ipympl for `%matplotlib widget`; first fetches the course's 32 COCO photos into the user cache (once; offline it says so
## in one line and the notebooks use synthetic images); opens nbs/00_index.ipynb on http://127.0.0.1 (LAB_PORT, default 8888).
LAB_PORT ?= 8888
KERNEL_JSON := $(VENV)/share/jupyter/kernels/detr-explained/kernel.json
$(KERNEL_JSON): $(VENV)/.installed tools/kernelspec.py
	$(BIN)/python tools/kernelspec.py install

lab: setup $(KERNEL_JSON)
	@$(BIN)/detr-explained course-photos || true   # offline: its one line says the synthetic set is used
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --ServerApp.root_dir=$(CURDIR) \
	  $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True) nbs/00_index.ipynb

bench: setup
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs _proc _docs .pytest_cache docs/_build
