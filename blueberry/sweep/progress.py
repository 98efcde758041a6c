"""Live progress of a sweep on the terminal that started it: trial i of N, its step of S, loss, tokens/s and
ETAs for the trial and the sweep.

Read from the trials' own run records (the last row of each running trial's metrics.jsonl and the steps in
its spec.json), so the trial processes need no channel back to the controller and their logs under
runs/_sweeps/ stay as they are. On a terminal: one line redrawn in place (tqdm); in a log file: a plain
line every LOG_EVERY_S seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blueberry.fileio import read_json
from blueberry.tracking.schema import METRICS_FILE, SPEC_FILE

REDRAW_S = 1.0
LOG_EVERY_S = 30.0
TAIL_BYTES = 16_384  # a metrics row with per-expert router columns is a few KB


def last_row(path: Path, key: str = "train/loss") -> dict | None:
    """The last complete JSON object in a metrics.jsonl that has `key` (a torn last line is skipped)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_BYTES))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get(key), (int, float)):
            return row
    return None


def planned_steps(run_dir: Path) -> int | None:
    """train.steps of the spec the trial runs (its run record's header)."""
    try:
        steps = (read_json(run_dir / SPEC_FILE) or {})["spec"]["train"]["steps"]
    except (KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and steps > 0 else None


def fmt_eta(seconds: float | None) -> str:
    """[H:]MM:SS as tqdm's bars write a time, or "?" where none is known yet."""
    from tqdm import tqdm

    return "?" if seconds is None else tqdm.format_interval(round(seconds))


@dataclass
class TrialView:
    number: int  # 1-based position in the sweep
    run_id: str
    step: int = 0
    steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.steps or not self.step:
            return None
        return (self.steps - self.step) * self.elapsed_s / self.step

    def text(self, total: int | None) -> str:
        parts = [f"trial {self.number}/{total or '?'}"]
        parts.append(f"step {self.step}/{self.steps or '?'}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        parts.append(f"ETA {fmt_eta(self.eta_s)}")
        return " ".join(parts)


class SweepProgress:
    """Call `update(running, done)` as often as you like; it redraws at most every REDRAW_S seconds.

    `running`: [(trial number, run_id, run_dir or None)]; `done`: durations (s) of the trials finished by this
    invocation, from which the sweep's ETA is estimated; `total`: the sweep's planned trials (None: unknown);
    `outer` (set it to use it): given the trials finished by this invocation, text put before the sweep's (a
    study's progress).
    """

    def __init__(self, name: str, total: int | None, parallel: int, stream=None, log=print):
        self.name, self.total, self.parallel = name, total, max(1, parallel)
        self.outer = None
        self.stream = stream or sys.stderr
        self.log = log
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.last_draw = self.last_log = 0.0
        self._steps: dict[str, int | None] = {}

    def view(self, number: int, run_id: str, run_dir: Path | None) -> TrialView:
        trial = TrialView(number, run_id)
        if run_dir is None:
            return trial
        if self._steps.get(run_id) is None:
            self._steps[run_id] = planned_steps(run_dir)
        trial.steps = self._steps[run_id]
        row = last_row(run_dir / METRICS_FILE)
        if row is not None:
            trial.step = int(row.get("step") or 0)
            trial.loss = float(row["train/loss"])
            rate = row.get("perf/tokens_per_s")
            trial.tokens_per_s = float(rate) if isinstance(rate, (int, float)) else None
            elapsed = row.get("time")
            trial.elapsed_s = float(elapsed) if isinstance(elapsed, (int, float)) else 0.0
        return trial

    def sweep_eta_s(self, trials: list[TrialView], done: list[float], ended_before: int) -> float | None:
        """Remaining trials × the mean trial time, shared by the parallel workers, plus what running ones need.
        `done`: the durations of the trials this controller saw finish; `ended_before`: every other trial that
        ended (before this controller, or stopped, failed or crashed since): neither is still to run."""
        if self.total is None:
            return None
        per_trial = sum(done) / len(done) if done else None
        if per_trial is None:  # no trial finished yet: estimate one from the running trials' pace
            paced = [t.elapsed_s + t.eta_s for t in trials if t.eta_s is not None]
            per_trial = sum(paced) / len(paced) if paced else None
        if per_trial is None:
            return None
        waiting = max(0, self.total - ended_before - len(done) - len(trials))
        running = max((t.eta_s or 0.0 for t in trials), default=0.0)
        return running + waiting * per_trial / self.parallel

    def update(
        self, running: list[tuple[int, str, Path | None]], done: list[float], ended_before: int = 0, stopped: int = 0
    ):
        """`done`: durations of the trials finished since this controller started; `stopped`: the trials that ended
        otherwise since (early-terminated, failed, crashed); `ended_before`: those ended before it started."""
        now = time.monotonic()
        if now - self.last_draw < REDRAW_S:
            return
        self.last_draw = now
        trials = [self.view(*item) for item in running]
        finished = ended_before + stopped + len(done)
        eta = self.sweep_eta_s(trials, done, ended_before + stopped)
        head = f"{self.name}: {finished}/{self.total or '?'} done"
        if self.outer is not None:
            head = f"{self.outer(len(done) + stopped)} | {head}"
        line = " | ".join([head, *(t.text(self.total) for t in trials), f"sweep ETA {fmt_eta(eta)}"])
        if self.tty:
            self._draw(line)
        elif now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            self.log(line)

    def _draw(self, line: str) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=self.total, file=self.stream, unit="trial", dynamic_ncols=True, leave=False, bar_format="{desc}"
            )
        width = shutil.get_terminal_size().columns - 1  # one screen line, or it scrolls instead of redrawing
        self.bar.set_description_str(line if len(line) <= width else line[: width - 1] + "…", refresh=True)

    def write(self, message: str) -> None:
        """A line above the live one (a trial started or ended), without tearing it."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            self.log(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
