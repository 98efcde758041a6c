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
    merely contains an installed copy (a project whose .venv holds site-packages). Where git could not say
    (not installed; a checkout it refuses, owned by another user), `git_error` says why."""
    failures: list[str] = []

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=SOURCE_TREE, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            failures.append(f"git could not run ({type(exc).__name__}: {exc})")
            return None
        # exit 1: not tracked; 128 with "not a git repository": no checkout; any other 128: git refuses this one
        if done.returncode == 128 and "not a git repository" not in done.stderr:
            failures.append(done.stderr.strip().splitlines()[0] if done.stderr.strip() else "git exited 128")
        return done.stdout.strip() if done.returncode == 0 else None

    version = {"package_version": _version("blueberry")}
    if git("ls-files", "--error-unmatch", "blueberry/provenance.py") is None:  # this file, from SOURCE_TREE
        code = {"git_sha": None, "git_dirty": None, **version}
        if failures and _inside_a_checkout():
            code["git_error"] = failures[0]
        return code
    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None
    return {"git_sha": sha, "git_dirty": dirty, **version}


def _inside_a_checkout() -> bool:
    """SOURCE_TREE lies in a git work tree (a `.git` in it or a folder above), whatever git itself says, and is
    no installed copy (site-packages, perhaps in a project's .venv: that project's repository is not ours)."""
    if SOURCE_TREE.name in ("site-packages", "dist-packages"):
        return False
    return any((folder / ".git").exists() for folder in (SOURCE_TREE, *SOURCE_TREE.parents))


def library_versions() -> dict:
    return {name: _version(name) for name in LIBRARIES}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
