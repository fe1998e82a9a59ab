# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
KERNEL := bsharedrag
STAMP  := $(VENV)/.installed

.PHONY: setup data backbone demo ablations test test-floors bench clean-venv

# torch==2.13.0 first: on these machines it is the CPU build on local disk; a plain `torch` requirement would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.6,<2.15"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (bsharedrag)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(PY) -m bsharedrag.data fetch

backbone: setup
	$(PY) -m bsharedrag.backbone prepare

demo: data backbone
	$(PY) -m bsharedrag.run configs/demo.yaml

# 07's full grid (seeds, lambda sweep, Parametric RAG on every generation question) after the demo chain.
# REUSE=<run_id> of a finished `make demo` links its 01-06 (same settings) instead of recomputing them.
ablations: data backbone
	$(PY) -m bsharedrag.run configs/ablations.yaml $(if $(REUSE),--reuse $(REUSE))

test: data backbone
	$(PY) -m pytest -q tests

# The test suite on the lowest versions pyproject.toml allows (uv's lowest-direct resolution: the floor of every direct
# dependency, the newest of the rest), in its own .venv-floors; its torch floor comes from PyPI (a CUDA build, ~3 GB).
FLOORS := .venv-floors
test-floors: data backbone
	$(PY) -m pip install --quiet "uv>=0.5"
	test -x $(FLOORS)/bin/python || $(PYTHON) -m venv $(FLOORS)
	$(VENV)/bin/uv pip compile --quiet pyproject.toml --extra dev --resolution lowest-direct \
		--python $(FLOORS)/bin/python -o $(FLOORS)/floors.txt
	$(VENV)/bin/uv pip sync --quiet --python $(FLOORS)/bin/python $(FLOORS)/floors.txt
	$(VENV)/bin/uv pip install --quiet --python $(FLOORS)/bin/python --no-deps -e .
	$(FLOORS)/bin/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (bsharedrag)" >/dev/null
	$(FLOORS)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV) $(FLOORS)

# Encoding throughput against the measured matmul limits and sentence-transformers; RUN=outputs/<run_id> uses its adapter.
bench: backbone
	$(PY) -m bsharedrag.bench $(if $(RUN),--run $(RUN))
