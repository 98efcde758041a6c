"""Tracking: one Tracker interface; the local run record and W&B behind it."""

from blueberry.fileio import write_json_atomic, write_text_atomic
from blueberry.tracking.base import Tracker, Trackers
from blueberry.tracking.record import RunRecord, read_metrics
from blueberry.tracking.wandb_settings import resolve_mode
from blueberry.tracking.wandb_tracker import WandbTracker, new_run_id, sweep_tag

__all__ = [
    "RunRecord",
    "Tracker",
    "Trackers",
    "WandbTracker",
    "new_run_id",
    "read_metrics",
    "resolve_mode",
    "sweep_tag",
    "write_json_atomic",
    "write_text_atomic",
]
