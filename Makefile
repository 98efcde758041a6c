# Blueberry: `make run` and `make test` work on a fresh machine (they install what they need).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Offline first: the Hugging Face Hub is never contacted; W&B stays offline unless WANDB_MODE=online.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline}

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned: 2.13.0 is a local CPU build here; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(OFFLINE) $(BIN)/blueberry run experiments/quickstart.json

test: install
	$(OFFLINE) $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check blueberry tests scripts
	$(BIN)/ruff format --check blueberry tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
