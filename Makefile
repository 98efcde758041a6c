# Blueberry: `make run` and `make test` work on a fresh machine (they install what they need).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Offline first: the Hugging Face Hub is never contacted; W&B stays offline unless WANDB_MODE=online.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline}

.PHONY: install lock run study quickstart sweep test lint clean report bench gpu-check

install: $(STAMP)

# uv installs the locked tree in seconds, torch included where pip's configuration names folders of wheels
# (find-links) to take it from; elsewhere pip installs torch first.
UV_VERSION := 0.13.9
UV := $(BIN)/uv
# pip's find-links: here a folder holding torch 2.13.0 as a local CPU build (an unpinned torch, or torch from an
# index, is a multi-GB CUDA build). `make lock` resolves against them too.
TORCH_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
FIND_LINKS = $(foreach links,$(TORCH_FIND_LINKS),--find-links $(links))
TORCH_BY_UV = $(if $(strip $(TORCH_FIND_LINKS)),$(FIND_LINKS) torch==2.13.0)

$(UV):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

# From a clean clone on 2 cores, uv's cache empty: 60-72 s with torch in uv's install, 84-92 s with pip
# installing torch first (pip resolves torch's dependencies again, then installs them one by one).
$(STAMP): setup.cfg pyproject.toml requirements.lock Makefile | $(UV)
	$(if $(TORCH_BY_UV),: torch 2.13.0 comes from $(TORCH_FIND_LINKS),$(BIN)/pip install --quiet torch==2.13.0)
	# Exactly as locked: no resolution, so nothing touches torch (requirements.lock leaves torch out and lists
	# its dependencies). Compiled to bytecode now: where Python may not write .pyc files
	# (PYTHONDONTWRITEBYTECODE, read-only trees) every process would recompile torch, transformers and wandb
	# from source, seconds per `blueberry run` on a slow CPU.
	$(UV) pip install --python $(BIN)/python --quiet --no-deps --compile-bytecode $(TORCH_BY_UV) -r requirements.lock
	$(UV) pip install --python $(BIN)/python --quiet --no-deps -e .
	# Our own modules too: the editable install leaves them in this tree, which uv does not compile. An edited
	# module's .pyc is stale and Python compiles it again, as it would without one.
	$(BIN)/python -m compileall -q blueberry
	touch $(STAMP)

# Refresh requirements.lock after changing setup.cfg: Linux x86-64, Python 3.11, extras dev and publish,
# numpy 2 despite the sweep engine's cap (requirements/overrides.txt), torch resolved against the local build
# pip knows (its find-links) and left out of the lock.
lock: | $(UV)
	echo "torch==2.13.0" > $(VENV)/torch-constraint.txt
	$(UV) pip compile setup.cfg --extra dev --extra publish --override requirements/overrides.txt \
		--constraint $(VENV)/torch-constraint.txt $(FIND_LINKS) \
		--no-emit-package torch --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--annotation-style line --custom-compile-command "make lock" --upgrade -o requirements.lock

# The study in miniature: Experiment 1 (seven presets x 3 seeds) as the CPU twin, or on a CUDA GPU at the
# study's shape, time-boxed; then the report, with mean ± sd and noise verdicts. `blueberry doctor` says which.
QUICK_EXPERIMENT ?= $(shell $(BIN)/python -c "import torch; print('exp1-ablation-quick' if torch.cuda.is_available() else 'exp1-ablation-cpu')" 2>/dev/null)
# A failed trial (exit 1) still gets its report, then make fails; bad input (2) or an interruption gets none.
run: install
	$(OFFLINE) $(BIN)/blueberry study --quick; status=$$?; \
	if [ $$status -le 1 ]; then $(OFFLINE) $(BIN)/blueberry report --show $(QUICK_EXPERIMENT) || exit; fi; \
	exit $$status

# The whole study (every experiment x 3 seeds; CPU twins on a CPU, ≤ 90 min on 2 cores), resumable: run it
# again after Ctrl-C. Then the findings into docs/results/ and the README's timeline.
RESULTS ?= docs/results
study: install
	$(OFFLINE) $(BIN)/blueberry study; status=$$?; \
	if [ $$status -le 1 ]; then $(OFFLINE) $(BIN)/blueberry report --out $(RESULTS) --readme README.md || exit; fi; \
	exit $$status

# One run of the default spec (1-4 minutes on 2 CPU cores; README, "Two commands").
quickstart: install
	$(OFFLINE) $(BIN)/blueberry run experiments/quickstart.json

# A W&B sweep YAML run offline by W&B's own engine (resumable): make sweep SWEEP=sweeps/cpu/lr_attention_moe.yaml
SWEEP ?= sweeps/cpu/ablation.yaml
sweep: install
	$(OFFLINE) $(BIN)/blueberry sweep $(SWEEP)

# Two workers, work-stealing: most of a test's time on a small CPU is a `blueberry run` process importing torch,
# transformers and wandb on one core; the other worker uses the other core meanwhile (tests/conftest.py gives
# each worker one thread). The suite on a 2-core AVX2 EPYC: 15-18 min in one process, 6-10 min with two from a
# clean clone, the install included (README: make test).
# TEST_WORKERS=0 runs the suite in one process.
# PYTEST_ARGS: more pytest options; .ci/run gives `--hypothesis-profile=ci` (hypothesis's own CI profile: the
# property tests draw the same examples every run, so CI cannot turn red by chance; locally they draw afresh).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: install
	$(OFFLINE) $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

# Throughput, MFU and memory per variant, speed ratios and speed targets: one table, JSON in reports/bench/.
# make bench AGAINST=REV: instead, the study's 512d dense and MoE steps at git revision REV against this tree.
bench: install
	$(OFFLINE) $(BIN)/blueberry bench $(if $(AGAINST),--against $(AGAINST))

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

# The virtualenv and pytest's cache; never runs/ (run records, checkpoints, W&B runs not yet synced).
clean:
	rm -rf $(VENV) .pytest_cache
