# `make run`: set up .venv and run the whole lifecycle with `dvc repro`.
# `make test`: set up .venv (with test extras), lint with ruff, and run the test suite (2 pytest-xdist workers).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned; where a local wheel directory is configured (PIP_FIND_LINKS), uv must look there too
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test lint install params dvc.yaml clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q uv >/dev/null 2>&1 || true
	@if [ -x $(VENV)/bin/uv ]; then \
		$(VENV)/bin/uv pip install -q --python $(PY) $(FIND_LINKS) -e '.[test]'; \
	else \
		$(PY) -m pip install -q -e '.[test]'; \
	fi
	@touch $@

install: $(VENV)/.installed

run: install
	dvc repro

lint: install
	@$(PY) -m ruff check .

# 2 pytest-xdist workers, one test at a time each; tests/conftest.py groups the tests that share an expensive
# session fixture or start processes of their own. `make test PYTEST_WORKERS=0` runs the suite in one process.
PYTEST_WORKERS ?= 2
test: lint
	@OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

# the two files derived from the project: params.yaml from conf/, dvc.yaml from the chain in stages/
params: install
	$(PY) -m pipeline.config

dvc.yaml: install
	$(PY) -m pipeline.harness.dvcfile

clean:
	rm -rf data/prepared artifacts metrics reports wandb outputs multirun
