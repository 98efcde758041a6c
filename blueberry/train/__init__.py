"""Training: optimizers, LR schedule, evaluation and the loop."""

from blueberry.train.evaluate import evaluate
from blueberry.train.trainer import TrainingDiverged, autocast_for, train

__all__ = ["TrainingDiverged", "autocast_for", "evaluate", "train"]
