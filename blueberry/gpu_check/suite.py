"""The gpu-check programme: a list of named checks, each in its own time box, all under one overall budget.

A check is a function of the shared `Context` that returns its findings as `rows` (item, value) plus raw
figures; it fails by raising (`CheckFailed` for a finding, any other exception for a crash) and is skipped when
no time is left for it. Checks run in order; later ones (the projection) read earlier ones' figures from
`Context.results`. Nothing here is CUDA-specific: the device is a parameter, so tests run checks on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckFailed(Exception):
    """A check ran and found something wrong (as opposed to crashing)."""


class CheckSkipped(Exception):
    """A check could not run here (no time left, or what it needs is missing); not a failure."""


@dataclass
class Context:
    device: torch.device
    work_dir: Path  # scratch space for run records and W&B offline runs
    shape: list[str] = field(default_factory=list)  # overrides giving every measured spec its shape
    run_shape: list[str] = field(default_factory=list)  # extra overrides for the launched runs (tiny in tests)
    deadline: float = float("inf")  # time.monotonic() by which everything must be done
    results: dict[str, dict] = field(default_factory=dict)  # check name -> its figures, for later checks
    log: Callable[[str], None] = print

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    time_box_s: float
    run: Callable[[Context, float], dict]  # (context, time box in seconds) -> {"rows": [(item, value)], ...}


@dataclass
class Outcome:
    name: str
    title: str
    status: str  # ok | failed | skipped
    seconds: float
    time_box_s: float
    rows: list[tuple[str, str]]
    figures: dict
    error: str | None = None


MIN_CHECK_S = 5.0  # a check with less time than this left is skipped, not started


def run_checks(checks: list[Check], context: Context) -> list[Outcome]:
    """Run each check within min(its box, the time left overall); one check's failure never stops the rest."""
    outcomes = []
    for check in checks:
        box = min(check.time_box_s, context.seconds_left())
        started = time.monotonic()
        if box < MIN_CHECK_S and check.time_box_s > MIN_CHECK_S:  # a check boxed shorter (arithmetic) always runs
            outcomes.append(Outcome(check.name, check.title, "skipped", 0.0, box, [], {}, "no time left"))
            continue
        context.log(f"gpu-check: {check.name} ({check.title}), time box {box:.0f} s")
        try:
            figures = check.run(context, box)
            status, error = "ok", None
        except CheckSkipped as exc:
            figures, status, error = {}, "skipped", str(exc)
        except CheckFailed as exc:
            figures, status, error = getattr(exc, "figures", {}), "failed", str(exc)
        except Exception as exc:  # a crash in one check is that check's result, not the programme's end
            figures, status, error = {}, "failed", f"{type(exc).__name__}: {exc}"
        context.results[check.name] = figures
        seconds = time.monotonic() - started
        outcomes.append(
            Outcome(check.name, check.title, status, seconds, box, list(figures.get("rows", [])), figures, error)
        )
        context.log(f"gpu-check: {check.name} {status} in {seconds:.1f} s" + (f": {error}" if error else ""))
    return outcomes
