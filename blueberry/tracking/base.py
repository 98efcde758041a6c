"""The one interface the trainer logs through (torchtitan-style thin logger)."""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    """Receives metrics keyed by name (`train/loss`, `val/loss`, ...) against the optimizer step."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, state: str, reason: str | None = None, exit_code: int = 0) -> None:
        """`exit_code`: the process's exit status for this end (0 finished, 1 failed, 128 + the signal's number
        interrupted: the convention W&B documents for runs stopped by a signal), recorded as W&B records it."""


class Trackers:
    """Fans every call out to several trackers (the local record and W&B)."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(values)

    def finish(self, state: str, reason: str | None = None, exit_code: int = 0) -> None:
        for tracker in self.trackers:
            tracker.finish(state, reason, exit_code)
