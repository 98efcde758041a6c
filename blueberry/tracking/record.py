"""The local run record: the source of truth for reports, in every W&B mode.

runs/<experiment>/<run_id>/
  spec.json      validated spec + hash, seed, data fingerprint, code version, parameter counts
  metrics.jsonl  one JSON object per logged step, append-only (a torn last line is skipped by readers)
  summary.json   final and best metrics
  status.json    running | finished | failed | interrupted, with the reason and the host
  checkpoints/   step-<step>.pt, the last K (blueberry.train.checkpoint)
  checkpoints.sha256  their checksums, verified before a resume loads one
  wandb/         the W&B offline run (`wandb sync runs/<experiment>/<run_id>/wandb/offline-run-*`) unless
                 tracking.wandb_dir or WANDB_DIR puts W&B's files elsewhere;
                 one offline-run-* per attempt of a resumed run, synced in order into one W&B run

A live run holds an exclusive lock (flock) on its directory; the kernel drops it when the process dies,
even by SIGKILL. So "running" with the lock free means the run crashed, and the directory can be
claimed to resume it. A resumed run keeps its directory: spec.json gains a `resumes` entry and
metrics.jsonl is cut back to the checkpoint's step, so it never holds a step twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blueberry.fileio import finite, read_json, write_json_atomic, write_text_atomic
from blueberry.spec import safe_name
from blueberry.tracking.preflight import PreflightError
from blueberry.tracking.schema import METRICS_FILE, SPEC_FILE, STATUS_FILE, STEP, SUMMARY_FILE, TIME

PROBE_GRACE_S = 0.05  # longer than `run_is_live` holds its shared lock (two system calls)


@dataclass
class RunDir:
    """A run directory claimed by this process, and whether an earlier attempt of the run left it."""

    path: Path
    lock_fd: int
    reused: bool
    previous_state: str | None = None  # status of the earlier attempt ("running" when it crashed)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # earlier attempts left alone as unreadable

    def release(self) -> None:
        os.close(self.lock_fd)  # closing the descriptor drops the flock


def _lock(path: Path) -> int | None:
    """Exclusive, non-blocking flock on a directory: its descriptor, or None if a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not a directory, or gone: nothing to claim
        return None
    for attempt in range(2):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt == 0:  # maybe only `run_is_live` looking (a moment); a live run holds it for its lifetime
                time.sleep(PROBE_GRACE_S)
    os.close(fd)
    return None


def locked_by_a_live_process(path: Path) -> bool:
    """Whether a live process of this host holds the run directory's lock (False where there is no directory)."""
    if not path.is_dir():
        return False
    fd = _lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def run_is_live(path: Path) -> bool:
    """Whether a live process holds the run directory's lock: a record that says "running" while none does
    belongs to a process that died without saying so (SIGKILL, the OOM killer, a machine that stopped).

    Only a run of this host can be told dead: a record copied from another machine (rsync of a cluster's
    runs/) holds no lock here, its run may still be alive there. It looks with a shared lock dropped at once;
    a claim meeting it waits PROBE_GRACE_S and tries again, so looking never makes a resuming run pass its own
    directory by. Where it cannot tell (another host, a filesystem without locks) it answers True.
    """
    host = (read_json(path / STATUS_FILE) or {}).get("host")
    if host is not None and host != socket.gethostname():
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no flock on this filesystem: no run could lock it either
        return True
    finally:
        os.close(fd)  # drops the shared lock, if taken


def claim_run_dir(
    runs_root: str | Path,
    experiment: str,
    run_id: str,
    reuse: Callable[[Path, str], bool] | None = None,
    create: bool = True,
) -> RunDir | None:
    """Lock the run directory for `run_id`: an earlier attempt that `reuse(path, state)` accepts, else a new
    one (None if `create` is false).

    Attempts are runs/<experiment>/<run_id>, then <run_id>-2, -3, ...; those held by a live process are
    skipped, so concurrent runs of one spec never share a directory. `state` is the attempt's status
    ("running" for one that crashed).
    """
    parent = Path(runs_root) / safe_name(experiment)  # safe_name: one plain path component, never ".."
    base = safe_name(run_id)
    pattern = re.compile(rf"^{re.escape(base)}(?:-(\d+))?$")
    existing = parent.iterdir() if parent.is_dir() else ()
    taken = sorted(int(m.group(1) or 1) for p in existing if (m := pattern.match(p.name)))
    skipped: list[tuple[Path, str]] = []
    for attempt in taken if reuse is not None else ():
        path = parent / (base if attempt == 1 else f"{base}-{attempt}")
        fd = _lock(path)
        if fd is None:
            continue
        status = read_json(path / STATUS_FILE)
        if status is None and create and not (path / STATUS_FILE).exists():
            return RunDir(path, fd, reused=False)  # died (or is being set up) before writing anything: as new
        if status is not None and reuse(path, status.get("state")):
            problem = resume_problem(path)
            if problem is None:
                return RunDir(path, fd, reused=True, previous_state=status.get("state"), skipped=skipped)
            skipped.append((path, problem))
        elif status is None:
            skipped.append((path, "status.json is not a JSON object"))
        os.close(fd)
    if not create:
        return None
    _make_dir(parent, runs_root, parents=True)
    for attempt in range(max(taken, default=0) + 1, max(taken, default=0) + 10_000):
        path = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            _make_dir(path, runs_root)  # atomic: two concurrent runs never create the same directory
        except FileExistsError:
            continue
        fd = _lock(path)
        if fd is not None:  # else another process claimed the empty directory first: it is theirs
            return RunDir(path, fd, reused=False, skipped=skipped)
    raise RuntimeError(f"could not allocate a run directory under {parent}")


def resume_problem(run_dir: Path) -> str | None:
    """Why an earlier attempt's record cannot be continued (what RunRecord and the resume read from it), or None."""
    status = read_json(run_dir / STATUS_FILE)
    if status is None:
        return "status.json is not a JSON object"
    started = status.get("started_at")
    if started is not None and (isinstance(started, bool) or not isinstance(started, (int, float))):
        return "status.json: started_at is not a number"
    header = read_json(run_dir / SPEC_FILE)
    if header is None and (run_dir / SPEC_FILE).exists():
        return "spec.json is not a JSON object"
    header = header or {}
    if not isinstance(header.get("spec_hash", ""), str):
        return "spec.json: spec_hash is not a string"
    resumes = header.get("resumes", [])
    if not isinstance(resumes, list) or not all(isinstance(r, dict) for r in resumes):
        return "spec.json: resumes is not a list of objects"
    try:
        if (run_dir / METRICS_FILE).exists():
            read_metrics(run_dir / METRICS_FILE)
    except (OSError, UnicodeDecodeError, RecordError) as exc:
        return str(exc)
    return None


def _make_dir(path: Path, runs_root: str | Path, parents: bool = False) -> None:
    """mkdir, with a refusal by the OS (read-only, not a directory, /proc...) as a PreflightError naming the runs
    root (checked before the run by preflight; this catches what changed since or what access() cannot tell)."""
    try:
        path.mkdir(parents=parents, exist_ok=parents)
    except FileExistsError:
        if parents:  # with exist_ok: the path is there, and no directory
            raise PreflightError(f"runs root '{runs_root}': {path} is a file, not a directory") from None
        raise  # a run directory another process made first: the caller tries the next name
    except OSError as exc:
        raise PreflightError(f"runs root '{runs_root}': cannot create {path}: {exc.strerror or exc}") from None


class RecordError(ValueError):
    """A run record file holds what the runner never writes (a row that is not an object, a step that is not an
    integer, a broken line before the last): the run is unreadable, for the reason given."""


def _metric_rows(path: Path):
    """(line, row) of each row of a metrics.jsonl. A torn last line (a crash mid-write) is skipped; any other
    malformed line raises RecordError naming it. Blank lines are skipped."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            if number == len(lines):
                return  # torn: the writer died mid-line
            raise RecordError(f"{path.name} line {number}: not JSON ({type(exc).__name__})") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path.name} line {number}: a JSON {type(row).__name__}, not an object")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RecordError(f"{path.name} line {number}: step {str(step)[:40]!r} is not an integer")
        yield line, row


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows up to `last_step` (and drop a torn last line), rewritten atomically."""
    if not path.exists():
        return
    kept = [line if line.endswith("\n") else line + "\n" for line, row in _metric_rows(path) if row[STEP] <= last_step]
    write_text_atomic(path, "".join(kept))


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (crash mid-write) is skipped, any other bad line is a
    RecordError."""
    return [row for _, row in _metric_rows(Path(path))]


class RunRecord:
    """Tracker writing the local run record. `resume_step`: continue an earlier attempt from that step."""

    def __init__(self, run_dir: Path, header: dict[str, Any], resume_step: int | None = None):
        self.dir = run_dir
        self.started = time.time()
        if resume_step is not None:
            previous = read_json(self.dir / SPEC_FILE) or {}
            resume = {"step": resume_step, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": header.get("code")}
            header = {
                **header,
                "created_at": previous.get("created_at", header.get("created_at")),
                "resumes": [*previous.get("resumes", []), resume],
            }
            self.started = (read_json(self.dir / STATUS_FILE) or {}).get("started_at", self.started)
            truncate_metrics(self.dir / METRICS_FILE, resume_step)
        write_json_atomic(self.dir / SPEC_FILE, header)
        self._summary: dict[str, Any] = {}
        self._metrics = open(self.dir / METRICS_FILE, "a", encoding="utf-8")
        self._status("running")

    def _status(self, state: str, reason: str | None = None, exit_code: int | None = None) -> None:
        status = {"state": state, "reason": reason, "started_at": self.started, "updated_at": time.time()}
        if exit_code is not None:  # the run has ended; the same exit code W&B records
            status["exit_code"] = exit_code
        status["host"] = socket.gethostname()  # where the lock that says "alive" can be seen (run_is_live)
        write_json_atomic(self.dir / STATUS_FILE, status)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {STEP: step, TIME: round(time.time() - self.started, 3), **metrics}
        self._metrics.write(json.dumps(finite(row)) + "\n")
        self._metrics.flush()

    def summary(self, values: dict[str, Any]) -> None:
        self._summary.update(values)
        write_json_atomic(self.dir / SUMMARY_FILE, self._summary)

    def finish(self, state: str, reason: str | None = None, exit_code: int = 0) -> None:
        self._metrics.close()
        self._status(state, reason, exit_code)
