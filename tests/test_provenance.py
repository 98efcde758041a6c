"""Which code a run records: the checkout blueberry runs from, never a repository that merely contains it."""

import subprocess

import blueberry.provenance as provenance


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def package_in(tree):
    (tree / "blueberry").mkdir(parents=True)
    (tree / "blueberry" / "provenance.py").write_text("")
    return tree


def commit_in(repo, *paths):
    git(repo, "init", "-q")
    if paths:
        git(repo, "add", *paths)
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first")
    return git(repo, "rev-parse", "HEAD")


def test_a_package_installed_inside_someone_elses_repository_records_no_commit(tmp_path, monkeypatch):
    project = tmp_path / "their-project"  # their .venv/lib/python3.x/site-packages holds our package, untracked
    site = package_in(project / ".venv" / "lib" / "site-packages")
    commit_in(project)
    monkeypatch.setattr(provenance, "SOURCE_TREE", site)
    assert provenance.code_version()["git_sha"] is None and provenance.code_version()["git_dirty"] is None


def test_a_clone_or_a_monorepo_holding_blueberry_records_its_commit_and_whether_it_had_changes(tmp_path, monkeypatch):
    clone = package_in(tmp_path / "blueberry-clone")
    sha = commit_in(clone, "blueberry")
    monkeypatch.setattr(provenance, "SOURCE_TREE", clone)
    assert provenance.code_version()["git_sha"] == sha and provenance.code_version()["git_dirty"] is False
    mono = tmp_path / "mono"
    research = package_in(mono / "research")
    sha = commit_in(mono, "research")
    (research / "blueberry" / "provenance.py").write_text("# changed")
    monkeypatch.setattr(provenance, "SOURCE_TREE", research)
    assert provenance.code_version()["git_sha"] == sha and provenance.code_version()["git_dirty"] is True


def test_a_checkout_git_cannot_read_says_why_rather_than_passing_for_an_installed_copy(tmp_path, monkeypatch):
    """git missing from PATH, or refusing a checkout another user owns ("dubious ownership", exit 128), read as
    "not a checkout": the run recorded no commit, as an installed copy does, without a word."""
    clone = package_in(tmp_path / "blueberry-clone")
    commit_in(clone, "blueberry")
    their_venv = package_in(tmp_path / "their-project" / ".venv" / "lib" / "site-packages")
    commit_in(tmp_path / "their-project")
    monkeypatch.setattr(provenance, "SOURCE_TREE", clone)
    refused = "fatal: detected dubious ownership in repository at '/x'\nTo add an exception for this directory..."
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", refused))
    code = provenance.code_version()
    assert code["git_sha"] is None and code["git_error"] == "fatal: detected dubious ownership in repository at '/x'"

    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.code_version()["git_error"].startswith("git could not run (FileNotFoundError")
    outside = package_in(tmp_path / "site-packages")  # an installed copy, no checkout: nothing to explain
    monkeypatch.setattr(provenance, "SOURCE_TREE", outside)
    assert "git_error" not in provenance.code_version()
    # nor in someone else's project's .venv: their repository is not ours
    monkeypatch.setattr(provenance, "SOURCE_TREE", their_venv)
    assert "git_error" not in provenance.code_version()
