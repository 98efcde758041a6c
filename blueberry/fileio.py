"""Atomic file writes and tolerant JSON reads: the one place for both (a leaf: imports nothing of ours).

A write goes to a temp file in the target's directory and is renamed over it, so a reader (or a crash)
never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What open() would give a new file; read once, at import (setting and restoring it races other threads).
NEW_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_writer(path: Path, binary: bool = False, mode: int | None = None, fsync: bool = False):
    """Yield a handle on a temp file next to `path`; on success it replaces `path`, on error it is removed.

    `mode`: the result's permissions; by default those open() gives a new file under the umask (mkstemp's
    0600 would hide run records from colleagues on a shared runs root). `fsync`: flush to disk before the
    rename (checkpoints).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        handle: IO
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, NEW_FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:  # a write or flush names no file: say which (disk full)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, required: bool = True):
    """Hold an exclusive lock on the file `path` (made if missing) for the block, which gets whether it holds it:
    processes sharing a folder take turns; the kernel releases it should this process die. Where the file system
    has no locks (NFS without a lock manager: ENOLCK), `required` raises that OSError, else the block runs
    unlocked (False)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if required:
                raise
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write `text` atomically. `mode`: the result's permissions (default: as open() under the umask)."""
    with atomic_writer(path, mode=mode) as handle:
        handle.write(text)


def finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any, mode: int | None = None) -> None:
    """JSON (NaN/inf as strings), written atomically."""
    write_text_atomic(path, json.dumps(finite(data), indent=2, sort_keys=True) + "\n", mode=mode)


def write_results(out_dir: str | Path, stem: str, data: Any, markdown: str, mode: int | None = None) -> Path:
    """A measurement's outputs (bench, its comparison, gpu-check): `<stem>.json` holding `data` and `<stem>.md`
    holding `markdown`, under `out_dir` (made if need be), each written atomically; the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", data, mode=mode)
    write_text_atomic(out / f"{stem}.md", markdown.rstrip("\n") + "\n", mode=mode)
    return out / f"{stem}.json"


@contextlib.contextmanager
def naming_the_file(path: Path):
    """An OSError inside that names no file (a full disk's write or close; numpy's short write, not even an errno)
    is raised again naming `path`, so what failed can be said."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        said = exc.strerror or f"a short write ({exc}): the disk is full or over quota"
        raise OSError(exc.errno, said, str(path)) from exc


def source_digest(paths) -> str:
    """A digest of these files' bytes and names: code keys a cache by it, so other code (an upgrade, a fix)
    never serves what the old code computed."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def is_number(value: Any) -> bool:
    """A number as JSON holds one: int or float, never a bool (Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(value, None), or (None, why not): missing, unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to parse
        return None, f"{path.name} unreadable ({type(exc).__name__}: {exc})"


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, unreadable or not an object."""
    value, _ = read_json_file(path)
    return value if isinstance(value, dict) else None
