"""The on-disk cache: its root directory and race-safe writes of cache entries."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The argument, else $BLUEBERRY_CACHE, else ~/.cache/blueberry. With no home directory (HOME unset for a
    user with no passwd entry: some containers and schedulers), a private folder in the temp directory."""
    cache_dir = cache_dir or os.environ.get("BLUEBERRY_CACHE")
    if cache_dir:
        return Path(cache_dir).expanduser()
    try:
        return Path.home() / ".cache" / "blueberry"
    except RuntimeError:  # "Could not determine home directory."
        return _private_temp_folder()


def _private_temp_folder() -> Path:
    """blueberry-cache-<uid> in the temp directory, made for this user alone; where another user made it first
    (theirs, or writable by others: its entries could be planted), a fresh private one, as matplotlib does."""
    folder = Path(tempfile.gettempdir()) / f"blueberry-cache-{os.getuid()}"
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, exist_ok=True)
        found = folder.lstat()
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid() and not found.st_mode & 0o022:
            return folder
    return Path(tempfile.mkdtemp(prefix="blueberry-cache-"))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `final` once the block succeeds.

    Readers never see a half-written entry, and concurrent writers (e.g. DDP ranks) are harmless:
    the first rename wins and the others' identical copies are dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def set_aside(entry: Path) -> None:
    """Move a damaged cache entry out of its name (kept, hidden, for a look) so a fresh one can take it; another
    process may have done so first."""
    with contextlib.suppress(OSError):
        os.rename(entry, entry.with_name(f".{entry.name}.damaged-{os.getpid()}-{time.time_ns()}"))  # pids recur
