"""Report tests: synthetic run records (the real on-disk format) and a headless Chromium."""

import fcntl
import os
import shutil
import subprocess

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _find_chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


@pytest.fixture(scope="session")
def chromium():
    """A real headless browser: Debian's chromium, installed here when missing and we are root."""
    path = _find_chromium()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        for attempt in ([], [["apt-get", "update"]]):  # stale package lists: update once, retry
            try:
                for cmd in [*attempt, install]:
                    subprocess.run(cmd, env=env, capture_output=True, timeout=600)
            except (subprocess.TimeoutExpired, OSError):  # no package mirror reachable in time: skip, below
                break
            path = _find_chromium()
            if path:
                break
    if path is None:
        pytest.skip(
            "no Chromium: /usr/bin/chromium is missing and `apt-get install chromium` was not possible "
            "(needs root and Debian packages); the dashboard's browser test cannot run here"
        )
    return path


@pytest.fixture
def browse(chromium, tmp_path):
    """Run headless Chromium on a file with extra flags; returns the CompletedProcess."""

    def run(page, *flags):
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
        cmd += ["--virtual-time-budget=5000", *flags, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    return run


@pytest.fixture
def alive():
    """hold(run_dir): lock a run directory as the live process of a "running" record does, until the test ends
    (a "running" record whose lock is free is a crashed run)."""
    held = []

    def hold(run_dir):
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
        return run_dir

    def release_all():
        while held:
            os.close(held.pop())

    hold.release_all = release_all
    yield hold
    release_all()
