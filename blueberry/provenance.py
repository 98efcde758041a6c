"""Where a result came from: code version and library versions, recorded with every run."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("blueberry", "torch", "transformers", "tokenizers", "datasets", "wandb", "pydantic")

# The folder holding the package: a checkout of Blueberry under an editable install (`make install`,
# `pip install -e .`) or a clone on PYTHONPATH; site-packages under `pip install .`, which holds no
# experiments/ or sweeps/ and whose git repository, if any, is someone else's project.
SOURCE_TREE = Path(__file__).resolve().parent.parent


def checkout_with(*folders: str) -> Path | None:
    """SOURCE_TREE if it holds every one of `folders` (e.g. "experiments", "sweeps"), else None."""
    return SOURCE_TREE if all((SOURCE_TREE / name).is_dir() for name in folders) else None


def code_version() -> dict:
    """Git SHA (and whether the tree had local changes) of the checkout blueberry runs from, if any: only a
    repository that tracks this package's files (a clone, or a monorepo holding Blueberry), not one that
    merely contains an installed copy (a project whose .venv holds site-packages)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=SOURCE_TREE, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "blueberry/provenance.py") is None:  # this file, from SOURCE_TREE
        return {"git_sha": None, "git_dirty": None, "package_version": _version("blueberry")}
    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None
    return {"git_sha": sha, "git_dirty": dirty, "package_version": _version("blueberry")}


def library_versions() -> dict:
    return {name: _version(name) for name in LIBRARIES}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
