"""Training: optimizers, LR schedule, evaluation, the metrics processor and the loop."""

from blueberry.train.evaluate import evaluate
from blueberry.train.trainer import Trainer, TrainingDiverged, autocast_for, train

__all__ = ["Trainer", "TrainingDiverged", "autocast_for", "evaluate", "train"]
