"""Which code a run records: the checkout blueberry runs from, never a repository that merely contains it."""

import subprocess

import blueberry.provenance as provenance


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit_in(path):
    git(path, "init", "-q")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first")
    return git(path, "rev-parse", "HEAD")


def test_a_package_installed_inside_someone_elses_repository_records_no_commit(tmp_path, monkeypatch):
    project = tmp_path / "their-project"  # their .venv/lib/python3.x/site-packages holds our package
    site = project / ".venv" / "lib" / "site-packages"
    (site / "blueberry").mkdir(parents=True)
    commit_in(project)
    monkeypatch.setattr(provenance, "SOURCE_TREE", site)
    assert provenance.code_version()["git_sha"] is None and provenance.code_version()["git_dirty"] is None


def test_a_checkout_records_its_commit_and_whether_it_had_changes(tmp_path, monkeypatch):
    checkout = tmp_path / "blueberry-clone"
    (checkout / "blueberry").mkdir(parents=True)
    sha = commit_in(checkout)
    monkeypatch.setattr(provenance, "SOURCE_TREE", checkout.resolve())
    assert provenance.code_version()["git_sha"] == sha and provenance.code_version()["git_dirty"] is False
