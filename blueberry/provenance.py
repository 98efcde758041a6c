"""Where a result came from: code version and library versions, recorded with every run."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("blueberry", "torch", "transformers", "tokenizers", "datasets", "wandb", "pydantic")


def code_version() -> dict:
    """Git SHA (and whether the tree had local changes) of the checkout blueberry runs from, if any."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

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
