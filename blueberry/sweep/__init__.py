"""Sweeps: W&B-native sweep YAMLs run by W&B's own engine, offline, one trial per process."""

from blueberry.sweep.config import Sweep, load_sweep
from blueberry.sweep.controller import UNTIL_STOPPED, SweepRunner, open_ended, plan
from blueberry.sweep.launch import build_trial

__all__ = ["UNTIL_STOPPED", "Sweep", "SweepRunner", "build_trial", "load_sweep", "open_ended", "plan"]
