# One entry point. `make repro` and `make test` both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dmdiff-installed

.PHONY: setup repro test smoke clean-runs

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "dmdiff needs Python >= 3.10"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# The main job on the default CPU preset: simulate the dataset and run the notebook study.
repro: setup
	$(VENV)/bin/dmdiff repro --out runs/repro

smoke: setup
	$(VENV)/bin/dmdiff repro --smoke --out runs/smoke

# The tests run on every core (at most 4 worker processes; pytest-xdist), whole modules per worker
# so that module-scoped fixtures (trained models, datasets) are built once.
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadscope

clean-runs:
	rm -rf runs
