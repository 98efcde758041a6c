"""Evaluation on the full, fixed validation set, weighted by tokens."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device: torch.device, autocast=contextlib.nullcontext):
    """Mean next-token loss and accuracy over every target of every validation window (each scored once)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast():
            logits = model(inputs).logits
        logits = logits.float()
        total_loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
        correct += (logits.argmax(-1) == targets).sum()
        count += targets.numel()
    model.train(was_training)
    loss = (total_loss / max(count, 1)).item()
    return {
        "val/loss": loss,
        "val/accuracy": correct.item() / max(count, 1),
        "val/perplexity": math.exp(min(loss, 20.0)),
        "val/tokens": count,
    }
