"""Warmup + cosine decay, counted in optimizer steps (the reference counted micro-steps: a bug)."""

from __future__ import annotations

import math

import torch

from blueberry.spec import TrainSpec


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Multiplier of the peak LR for the update with index `step` (0-based optimizer steps)."""
    if spec.schedule == "constant":
        return 1.0
    warmup = int(spec.warmup_fraction * spec.steps)
    if step < warmup:
        return (step + 1) / warmup  # never 0: the first update already learns
    progress = (step - warmup) / max(1, spec.steps - warmup - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], spec: TrainSpec
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, spec)) for opt in optimizers]
