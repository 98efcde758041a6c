"""Tracking: one Tracker interface; the local run record and W&B behind it."""

from blueberry.tracking.base import Tracker, Trackers
from blueberry.tracking.record import RunRecord, read_metrics
from blueberry.tracking.schema import sweep_tag
from blueberry.tracking.wandb_settings import resolve_mode
from blueberry.tracking.wandb_tracker import WandbTracker, new_run_id

__all__ = [
    "RunRecord",
    "Tracker",
    "Trackers",
    "WandbTracker",
    "new_run_id",
    "read_metrics",
    "resolve_mode",
    "sweep_tag",
]
