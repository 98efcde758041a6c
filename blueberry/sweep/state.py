"""Persistent sweep state: which trials were planned, and how each ended.

A trial is written here *before* it starts, so a sweep killed at any point knows every trial it
launched; the same `blueberry sweep` command then finishes or re-runs those and proposes the rest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blueberry.tracking import write_json_atomic

TERMINAL = ("finished", "failed", "crashed", "killed")


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


class SweepState:
    def __init__(self, path: Path, sweep_id: str, name: str):
        self.path = path
        self.sweep_id = sweep_id
        self.name = name
        self.trials: list[Trial] = []
        if path.is_file():
            data = json.loads(path.read_text())
            self.trials = [Trial(**t) for t in data["trials"]]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"sweep_id": self.sweep_id, "name": self.name, "trials": [asdict(t) for t in self.trials]}
        write_json_atomic(self.path, data)

    def next_run_id(self) -> str:
        return f"{self.sweep_id}-t{len(self.trials):03d}"

    def unfinished(self) -> list[Trial]:
        return [t for t in self.trials if t.state not in TERMINAL]
