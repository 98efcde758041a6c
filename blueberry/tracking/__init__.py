"""Tracking: one Tracker interface; the local run record and W&B behind it."""

from blueberry.fileio import write_json_atomic, write_text_atomic
from blueberry.tracking.base import Tracker, Trackers
from blueberry.tracking.record import RunRecord, allocate_run_dir, read_metrics
from blueberry.tracking.wandb_tracker import WandbTracker, resolve_mode

__all__ = [
    "RunRecord",
    "Tracker",
    "Trackers",
    "WandbTracker",
    "allocate_run_dir",
    "read_metrics",
    "resolve_mode",
    "write_json_atomic",
    "write_text_atomic",
]
