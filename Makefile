# `make run`: set up .venv and run the whole lifecycle with `dvc repro`.
# `make test`: set up .venv (.[test,sweep] at requirements/lock.txt's versions), lint with ruff, and run the tests not
# marked slow; `make test-all` (what CI runs) runs them all.
# Both on 2 pytest-xdist workers. `make lock`: re-resolve the lock after editing pyproject.toml (docs/dependencies.md).
# `make plots`: rewrite the offline page template of `dvc plots show` (make install writes it once; docs/loggers.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION ?= 0.13.9
# the exact versions `make install` installs: .[test,sweep] resolved for Python 3.11 on Linux x86-64, CPU torch
# (docs/dependencies.md). `make lock` rewrites it from pyproject.toml, keeping every pin that still fits.
LOCK := requirements/lock.txt
LOCK_EXTRAS := --extra test --extra sweep
TORCH_LOCK ?= 2.13.0+cpu
# the lock names the CPU wheel (torch==…+cpu); where a local wheel directory is configured (PIP_FIND_LINKS), uv
# must look there too. Without one, torch's plain version is asked of PyPI instead (its CUDA build), as before.
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
INSTALL_LOCK := $(if $(PIP_FIND_LINKS),$(LOCK),$(VENV)/lock-pypi-torch.txt)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-all lint install lock plots params dvc.yaml clean

$(UV):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q uv==$(UV_VERSION) >/dev/null 2>&1 || true

# the lock's packages, then the project itself on top (editable, --no-deps: the lock already holds its dependencies)
$(VENV)/.installed: pyproject.toml $(LOCK) | $(UV)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@sed 's/^torch==\([^+ ]*\)+cpu/torch==\1/' $(LOCK) > $(VENV)/lock-pypi-torch.txt
	@if [ -x $(UV) ]; then \
		$(UV) pip install -q --python $(PY) $(FIND_LINKS) -r $(INSTALL_LOCK) && \
		$(UV) pip install -q --python $(PY) --no-deps -e .; \
	else \
		$(PY) -m pip install -q -r $(INSTALL_LOCK) && $(PY) -m pip install -q --no-deps -e .; \
	fi
	@touch $@

# the page `dvc plots show` writes, drawn offline: DVC's HTML template with Vega, Vega-Lite and Vega-Embed inlined
# (~0.9 MB, so generated here and git-ignored), named in this clone's .dvc/config.local
PLOTS_TEMPLATE := .dvc/html/offline.html
$(PLOTS_TEMPLATE): $(VENV)/.installed pipeline/harness/plots_template.py
	@$(PY) -m pipeline.harness.plots_template

install: $(VENV)/.installed $(PLOTS_TEMPLATE)

plots: | $(VENV)/.installed
	$(PY) -m pipeline.harness.plots_template

# re-resolve the lock after editing pyproject.toml's dependencies (needs the CPU torch wheel in PIP_FIND_LINKS);
# `make lock UPGRADE=1` moves every package to its newest allowed version
lock: | $(UV)
	@test -n "$(PIP_FIND_LINKS)" || { echo "make lock: set PIP_FIND_LINKS to the directory of torch $(TORCH_LOCK)'s wheel"; exit 1; }
	@echo "torch==$(TORCH_LOCK)" > $(VENV)/torch-lock.txt
	$(UV) pip compile -q pyproject.toml $(LOCK_EXTRAS) $(FIND_LINKS) -c $(VENV)/torch-lock.txt --python $(PY) \
		$(if $(UPGRADE),--upgrade,) --custom-compile-command "make lock" -o $(LOCK)
	@! grep -E '^(nvidia-c|nvidia-n[cv]|triton==|cuda-)' $(LOCK) || { echo "$(LOCK) holds CUDA packages"; exit 1; }

run: install
	dvc repro

lint: install
	@$(PY) -m ruff check .

# 2 pytest-xdist workers, one test at a time each; tests/conftest.py groups the tests that share an expensive
# session fixture or start processes of their own. `make test` runs the tests not marked `slow` (~5 min on 2 cores);
# `make test-all` runs every test (~14 min: the end-to-end DVC, kill/resume and multi-process runs), as CI does.
# `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup
NO_TESTS := if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc
test: lint
	@$(PYTEST) -m "not slow"; rc=$$?; $(NO_TESTS)

test-all: lint
	@$(PYTEST); rc=$$?; $(NO_TESTS)

# the two files derived from the project: params.yaml from conf/, dvc.yaml from the chain in stages/
params: install
	$(PY) -m pipeline.config

dvc.yaml: install
	$(PY) -m pipeline.harness.dvcfile

clean:
	rm -rf data/prepared artifacts metrics reports wandb outputs multirun
