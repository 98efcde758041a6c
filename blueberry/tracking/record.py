"""The local run record: the source of truth for reports, in every W&B mode.

runs/<experiment>/<run_id>/
  spec.json      validated spec + hash, seed, data fingerprint, code version, parameter counts
  metrics.jsonl  one JSON object per logged step, append-only (a torn last line is skipped by readers)
  summary.json   final and best metrics
  status.json    running | finished | failed | interrupted, with the reason
  wandb/         the W&B offline run (`wandb sync runs/<experiment>/<run_id>/wandb/offline-run-*`)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from blueberry.spec import safe_name


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file + rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_finite(data), handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def allocate_run_dir(runs_root: str | Path, experiment: str, run_id: str) -> Path:
    """Create a fresh run directory; a taken id gets a numeric suffix (a re-run never overwrites)."""
    parent = Path(runs_root) / safe_name(experiment)
    parent.mkdir(parents=True, exist_ok=True)
    base = safe_name(run_id)
    for attempt in range(1, 10_000):
        candidate = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()  # atomic: two concurrent runs never get the same directory
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not allocate a run directory under {parent}")


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RunRecord:
    """Tracker writing the local run record."""

    def __init__(self, run_dir: Path, header: dict[str, Any]):
        self.dir = run_dir
        self.started = time.time()
        write_json_atomic(self.dir / "spec.json", header)
        self._summary: dict[str, Any] = {}
        self._metrics = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._status("running")

    def _status(self, state: str, reason: str | None = None) -> None:
        status = {"state": state, "reason": reason, "started_at": self.started, "updated_at": time.time()}
        write_json_atomic(self.dir / "status.json", status)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time() - self.started, 3), **metrics}
        self._metrics.write(json.dumps(_finite(row)) + "\n")
        self._metrics.flush()

    def summary(self, values: dict[str, Any]) -> None:
        self._summary.update(values)
        write_json_atomic(self.dir / "summary.json", self._summary)

    def finish(self, state: str, reason: str | None = None) -> None:
        self._metrics.close()
        self._status(state, reason)
