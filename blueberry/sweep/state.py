"""Persistent sweep state: the one queue of a sweep, shared by every `blueberry sweep` working on it.

A trial is written here *before* it starts, so a sweep killed at any point knows every trial it
launched; the same `blueberry sweep` command then finishes or re-runs those and proposes the rest.

Several controllers on one sweep (two terminals, or a restart while the old one lives) cooperate like
`wandb agent` workers: each read-modify-write of state.json happens under an exclusive lock (flock on
state.lock), and each trial names the controller that claimed it (`worker`: pid and process start time).
Only that controller launches and updates it; a trial whose controller died is claimed by the next one
that looks (stale-claim recovery), which waits for its trial process if that still runs.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from blueberry.fileio import write_json_atomic

TERMINAL = ("finished", "failed", "crashed", "killed")
FAILED = ("failed", "crashed")  # not `killed`: early termination stopped it, the sweep working as asked
STATES = ("pending", "running", *TERMINAL)


class SweepStateError(ValueError):
    """state.json as a whole cannot be read: the sweep cannot know which trials it ran."""


@dataclass
class Trial:
    run_id: str
    params: dict
    state: str = "pending"  # pending | running | finished | failed | crashed | killed
    reason: str | None = None
    run_dir: str | None = None
    pid: int | None = None  # of the trial's process, so a resumed sweep can wait for an orphaned trial
    summary: dict = field(default_factory=dict)  # flat numbers, as the engine needs them
    history: list[dict] = field(default_factory=list)  # metric rows (for bayes / early termination)
    worker: str | None = None  # the controller that claimed it: "<pid>:<start time>" (see this_worker)


_TRIAL = TypeAdapter(Trial)


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), None if it is gone.
    With the pid it names one process for good: a reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def this_worker() -> str:
    return f"{os.getpid()}:{_process_start(os.getpid())}"


def worker_alive(worker: str | None) -> bool:
    if not worker or ":" not in worker:
        return False
    pid, started = worker.split(":", 1)
    return pid.isdigit() and _process_start(int(pid)) == started


def parse_trial(entry: object) -> tuple[Trial | None, str | None]:
    """(trial, None), or (None, why) for an entry that is not one."""
    try:
        trial = _TRIAL.validate_python(entry, strict=False)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        return None, f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}"
    if trial.state not in STATES:
        return None, f"state: {trial.state[:40]!r} is not one of {', '.join(STATES)}"
    return trial, None


class SweepState:
    """The trials of one sweep. Read it and change it only inside `locked()`, which reloads it from disk."""

    def __init__(self, path: Path, sweep_id: str, name: str, check: Callable[[Trial], str | None] | None = None):
        """`check(trial)`: why a well-formed trial still does not belong to this sweep (None if it does)."""
        self.path = path
        self.sweep_id = sweep_id
        self.name = name
        self.check = check
        self.trials: list[Trial] = []
        self.unreadable: list[tuple[object, str]] = []  # (entry as found, why): kept in the file, never run
        self.load()

    def load(self) -> None:
        if self.path.exists() and not self.path.is_file():
            raise SweepStateError(f"sweep state {self.path} is not a file")
        if not self.path.is_file():
            self.trials, self.unreadable = [], []
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise SweepStateError(f"sweep state {self.path} is unreadable ({type(exc).__name__}: {exc})") from None
        entries = data.get("trials") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise SweepStateError(f"sweep state {self.path} has no list of trials")
        self.trials, self.unreadable = [], []
        for index, entry in enumerate(entries):
            trial, problem = parse_trial(entry)
            if trial is not None and self.check is not None:
                problem = self.check(trial)
            if problem is not None:
                self.unreadable.append((entry, f"trial {index}: {problem}"))
            else:
                self.trials.append(trial)

    @contextmanager
    def locked(self) -> Iterator[SweepState]:
        """Hold the sweep's lock, with the state as on disk now; `save()` inside it to publish changes."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name("state.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a file where its folder goes, a read-only disk
            raise SweepStateError(f"sweep state {self.path.parent}: cannot be made ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, or by the kernel if this process dies
            self.load()
            yield self
        finally:
            os.close(fd)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = [asdict(t) for t in self.trials] + [entry for entry, _ in self.unreadable]
        data = {"sweep_id": self.sweep_id, "name": self.name, "trials": entries}
        write_json_atomic(self.path, data)

    def put(self, trial: Trial) -> None:
        """Publish the new state of a trial this controller owns (under the lock, over the latest file)."""
        with self.locked():
            self.trials = [trial if t.run_id == trial.run_id else t for t in self.trials]
            if all(t.run_id != trial.run_id for t in self.trials):
                self.trials.append(trial)
            self.save()

    def next_run_id(self) -> str:
        return f"{self.sweep_id}-t{len(self.trials) + len(self.unreadable):03d}"

    def unfinished(self) -> list[Trial]:
        return [t for t in self.trials if t.state not in TERMINAL]

    def claimable(self) -> list[Trial]:
        """Unfinished trials no live controller owns: never claimed, or left by a controller that died."""
        return [t for t in self.unfinished() if not worker_alive(t.worker)]
