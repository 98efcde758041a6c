"""Sweeps: W&B-native sweep YAMLs run by W&B's own engine, offline, one trial per process."""

from blueberry.sweep.config import Sweep, load_sweep
from blueberry.sweep.controller import SweepRunner, plan
from blueberry.sweep.launch import build_trial

__all__ = ["Sweep", "SweepRunner", "build_trial", "load_sweep", "plan"]
