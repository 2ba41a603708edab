# Two commands do everything on a fresh machine with Python 3.11+ and git:
#   make demo   set up, then run the demo on an embedded PostgreSQL
#   make test   set up, then run the whole test suite against a real PostgreSQL
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test coverage lint schema bench readme mutants clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mf-worker demo

test: setup
	$(BIN)/python -m pytest -n auto --dist loadgroup

# The whole suite under coverage.py, the worker processes it starts included (pyproject's
# [tool.coverage.*]); prints line coverage of src/ per module. Separate from `make test`,
# which CI runs: measuring slows every process down.
coverage: setup
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m coverage run -m pytest -n auto --dist loadgroup
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m coverage combine --quiet
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m coverage report

# The code is formatted by hand to 100 columns (ruff format would rewrap most files), so lint
# is ruff's rules and mypy --strict (over src and tests: [tool.mypy] in pyproject), both clean.
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# The schema snapshot (src/mf_worker/db/schema.sql): what the migrations produce, regenerated
# after adding or changing a migration; tests/test_schema_snapshot.py compares it.
schema: setup
	$(BIN)/python -m tests.schema_snapshot

readme: setup
	$(BIN)/python tools/sync_readme.py

# Plant each bug of tools/mutants.toml alone, in a scratch copy of the tree, and run its tests:
# every mutant must be caught. Not part of CI (minutes); run it before resolving an issue that
# touches one of the promises it lists. `make mutants ONLY=claim-unfair,reaper-reaps-early`.
mutants: setup
	$(BIN)/python tools/mutants.py $(if $(ONLY),--only $(ONLY))

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.coverage .coverage.*
