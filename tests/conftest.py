"""Hermetic tests: W&B offline into tmp dirs, no API key, Hugging Face offline, caches in tmp."""

import os

import pytest

# `make test` runs two xdist workers on what may be two cores: each worker, and every `blueberry run` it starts,
# takes one thread (the runner reads OMP_NUM_THREADS), so two 2-thread torch pools never wait on each other's core.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One tokenizer/token cache for the whole session: each BPE is trained once, not per test or per xdist worker.

    xdist's workers share the parent of their temporary directories; cache entries are written by atomic rename
    (blueberry/data/cache.py), so two workers filling the same entry at once leave one complete copy.
    """
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "blueberry-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path, shared_cache):
    # Every W&B variable of the user's shell is unset (a WANDB__DISABLE_STATS changed what tests saw), WANDB_DIR
    # too: W&B's files go in each run's record, where tests read them (tests of WANDB_DIR set it).
    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    wandb_home = tmp_path / "wandb-home"
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        (wandb_home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(wandb_home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(shared_cache / "hf"))
    monkeypatch.setenv("BLUEBERRY_CACHE", str(shared_cache / "blueberry"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key, nothing written to the real home
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))  # W&B reads $NETRC before ~/.netrc
    yield
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()
