# Blueberry: `make run` and `make test` work on a fresh machine (they install what they need).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Offline first: the Hugging Face Hub is never contacted; W&B stays offline unless WANDB_MODE=online.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline}

.PHONY: install run quickstart sweep test lint clean report bench gpu-check

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned: 2.13.0 is a local CPU build here; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps sweeps==0.3.0
	touch $(STAMP)

# The study in miniature, offline: the CPU twin of the 5-variant ablation sweep, then the report.
run: install
	$(OFFLINE) $(BIN)/blueberry sweep sweeps/cpu/ablation.yaml
	$(OFFLINE) $(BIN)/blueberry report

# One run of the default spec (≈2 minutes on 2 CPU cores).
quickstart: install
	$(OFFLINE) $(BIN)/blueberry run experiments/quickstart.json

# A W&B sweep YAML run offline by W&B's own engine (resumable): make sweep SWEEP=sweeps/cpu/lr_attention_moe.yaml
SWEEP ?= sweeps/cpu/ablation.yaml
sweep: install
	$(OFFLINE) $(BIN)/blueberry sweep $(SWEEP)

test: install
	$(OFFLINE) $(BIN)/python -m pytest -q

# Throughput, MFU and memory per variant, speed ratios and speed targets: one table, JSON in reports/bench/.
bench: install
	$(OFFLINE) $(BIN)/blueberry bench

# On a machine with an NVIDIA GPU: prove and measure the CUDA path (≤ 8 min on an H100/H200); table on stdout,
# JSON + Markdown in $OUT if set, else reports/gpu-check/. Without a CUDA GPU it says so and exits 2.
gpu-check: install
	$(OFFLINE) $(BIN)/blueberry gpu-check

# Tables, plots, timeline and dashboard under reports/, rebuilt from the run records in runs/.
report: install
	$(OFFLINE) $(BIN)/blueberry report

lint: install
	$(BIN)/ruff check blueberry tests scripts
	$(BIN)/ruff format --check blueberry tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
