# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCK := requirements.lock

.PHONY: install lock run test test-fast lint bench docs build clean

install: $(STAMP)

# Exactly the versions of $(LOCK), pip and torch==2.14.1 / torchvision==0.29.1 included (the
# releases on this machine's disk); the package itself is built with the locked setuptools, its
# dependencies held to the lock. The stamp is rebuilt only when the package metadata or the lock
# changes, so a second `make` is a no-op.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

# Refresh the lock from the current environment (after upgrading or adding a package in it).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --all --exclude m3i_lightning > $(LOCK)
	@touch $(STAMP)

run: install
	$(BIN)/python -m m3i_lightning $(ARGS)

# Two pytest workers (pytest-xdist), each test file on one worker: the subprocess and
# 2-process tests wait on each other less; TEST_WORKERS=0 runs in one process. `make test` runs
# every tier (tests/unit, tests/distributed, tests/e2e) and lists the slowest tests;
# `make test-fast` the unit tier only.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test: install
	$(PYTEST) tests $(ARGS)

test-fast: install
	$(PYTEST) tests/unit $(ARGS)

lint: install
	$(BIN)/ruff check src tests scripts

# Training-step throughput, composition / overhead / masking ratios, peak memory, GPU MFU.
bench: install
	$(BIN)/python scripts/benchmark.py $(ARGS)

# The docs site into site/ (MkDocs Material + mkdocstrings, mkdocs.yml); a warning fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# A wheel and an sdist into dist/, built with the locked setuptools and checked by twine.
build: install
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache site dist
