# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

install: $(STAMP)

# torch/torchvision are pinned to the releases on this machine's disk (pip takes them locally);
# the stamp is rebuilt only when the package metadata changes, so a second `make` is a no-op.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/python -m m3i_lightning $(ARGS)

test: install
	$(BIN)/python -m pytest tests $(ARGS)

lint: install
	$(BIN)/ruff check src tests scripts

# Training-step throughput, composition / overhead / masking ratios, peak memory, GPU MFU.
bench: install
	$(BIN)/python scripts/benchmark.py $(ARGS)

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
