# The README's commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch pinned for a fast CPU install on these machines; pyproject states the real range.
TORCH_PIN ?= torch==2.13.0
# Triton ships wheels for Linux x86-64 only (pyproject's marker says the same); elsewhere the
# torch backend runs alone.
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
TRITON_PIN ?= triton==3.8.0
else
TRITON_PIN ?=
endif

.PHONY: install run test lint docs bench soak mutate gpu-static clean

install: $(STAMP)

# Triton (for the interpreter tests of the Triton kernels) only where wheels exist.
TRITON_EXTRA := $(if $(filter Linux/x86_64,$(shell uname -s)/$(shell uname -m)),$(TRITON_PIN),)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_EXTRA)
	$(PY) -m pip install -q -e '.[test,lightning,transformers,experiment,docs]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bio_transformations.experiments $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html
	$(VENV)/bin/sphinx-build -q -W --keep-going -b doctest docs docs/_build/doctest

# Benchmarks against the published package (installed into benchmarks/.upstream on first use).
# Results go to build/bench (QUICK=1: short rounds, build/bench-quick). RECORD=1 records a full
# run into benchmarks/results/<device> and refuses a tree with uncommitted tracked changes.
bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(RECORD),--record,) $(if $(QUICK),--quick,) $(ARGS)

# Long-run reliability check (not part of make test): 10,000 steps, checked every 1,000.
soak: $(STAMP)
	$(PY) benchmarks/soak.py $(ARGS)

# Mutation testing of the torch reference, its statistics and RNG helpers (mutmut; the modules
# and tests are listed under [tool.mutmut] in pyproject.toml). Runs in build/mutate, a copy of
# the repo laid out as installed (kernels/ -> bio_transformations/kernels/), so the mutated
# modules are the ones the tests import. One thread per test process: mutmut forks.
MUTATE_DIR := build/mutate
mutate: $(STAMP)
	$(PY) -m pip install -q -e '.[mutate]'
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	cp -r bio_transformations tests pyproject.toml $(MUTATE_DIR)/
	rm -rf $(MUTATE_DIR)/bio_transformations/kernels && cp -r kernels $(MUTATE_DIR)/bio_transformations/kernels
	cd $(MUTATE_DIR) && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PATH=$(abspath $(VENV))/bin:$$PATH && \
		mutmut run --max-children $(or $(JOBS),2) ; mutmut results > survivors.txt ; \
		mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json
	@echo "survivors: $(MUTATE_DIR)/survivors.txt (mutmut show NAME in $(MUTATE_DIR))"

# Static GPU report: every Triton kernel variant compiled for sm_90 and sm_80, no GPU needed.
# ARGS="--compare benchmarks/results/gpu_static/before.json" diffs against the recorded BEFORE.
gpu-static: $(STAMP)
	$(PY) benchmarks/gpu_static.py $(ARGS)

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .benchmarks build/mutate
