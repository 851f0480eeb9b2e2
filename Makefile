# The two commands a newcomer needs: `make repro` and `make test`. Each installs uv if it is absent,
# installs the locked environment (uv sync --frozen), then does its job.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
# two workers (pytest-xdist): most tests wait on subprocesses (DVC, torchrun, servers). One worker
# took 18 min in CI for 539 tests; two took 15 min for 583 on a loaded 2-core machine
PYTEST_ARGS ?= -n 2
REPRO_ARGS ?=

.PHONY: setup repro test lint docs parity push pull status-remote

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
	  python3 -m pip install --quiet uv || python3 -m pip install --quiet --user --break-system-packages uv
	$(UV) sync --frozen

# `dvc repro` that checks params.yaml first and, when a stage fails, puts back the outputs DVC removed
# (dvc checkout); arguments for dvc repro go in REPRO_ARGS, e.g. `make repro REPRO_ARGS="-s train"`.
# The wrapper is make's own child (exec, no `uv run` in between, which would outlive a killed make):
# it gets SIGTERM when make dies, even by kill -9, and stops dvc and the stage with it.
VENV_PYTHON = $(shell $(UV) run --frozen python -c 'import sys; print(sys.executable)')
repro: setup
	exec $(VENV_PYTHON) -m unpaired.repro $(REPRO_ARGS)

test: setup
	$(UV) run pytest $(PYTEST_ARGS)

# Parity with the references' own code (tests/test_reference_parity.py, docs/training.md): the
# folders of their `git archive`s, never committed; without them the tests are skipped.
parity: setup
	CUT_REFERENCE=$(CUT_REFERENCE) CYCLEGAN_REFERENCE=$(CYCLEGAN_REFERENCE) $(UV) run pytest -q -rs tests/test_reference_parity.py

# What CI checks before the tests: ruff's lint and format (configured in pyproject.toml).
lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .

# The generated docs: docs/params.md from the params classes' field docs.
docs: setup
	$(UV) run python -m unpaired.params_doc

# Sharing through the default DVC remote (see README, "Sharing with a DVC remote").
push: setup
	$(UV) run dvc push

pull: setup
	$(UV) run dvc pull || { $(UV) run unpaired remote-status; exit 1; }
	$(UV) run unpaired unpack

status-remote: setup
	$(UV) run dvc status --cloud
	$(UV) run unpaired remote-status
