# The README's commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch pinned for a fast CPU install on these machines; pyproject states the real range.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.8.0

.PHONY: install run test lint docs bench soak gpu-static clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install -q -e '.[test,experiment,docs]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bio_transformations.experiment $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html
	$(VENV)/bin/sphinx-build -q -W --keep-going -b doctest docs docs/_build/doctest

# Benchmarks against the published package (installed into benchmarks/.upstream on first use).
# QUICK=1: short rounds into build/bench-quick (keeps the recorded results untouched).
bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick --out build/bench-quick,) $(ARGS)

# Long-run reliability check (not part of make test): 10,000 steps, checked every 1,000.
soak: $(STAMP)
	$(PY) benchmarks/soak.py $(ARGS)

# Static GPU report: every Triton kernel variant compiled for sm_90 and sm_80, no GPU needed.
# ARGS="--compare benchmarks/results/gpu_static/before.json" diffs against the recorded BEFORE.
gpu-static: $(STAMP)
	$(PY) benchmarks/gpu_static.py $(ARGS)

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .benchmarks
