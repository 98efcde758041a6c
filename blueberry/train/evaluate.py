"""Evaluation on the full, fixed validation set, weighted by tokens."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

# On a CPU the loss and the accuracy are memory-bound: read in chunks of rows whose fp32 logits fit in a core's
# cache, they cost a third of one pass over the whole batch's logits (8,192- and 49,152-token vocabularies,
# measured on the 2-core dev machine). A GPU takes large chunks (thousands of small kernels would cost more),
# bounded so that the fp32 copy and cross_entropy's own stay small next to the model's bf16/fp16 logits: the
# batch-size probe measures training's chunked loss, and a micro-batch it picked must not run out of memory here.
CPU_CHUNK_BYTES = 2**20
GPU_CHUNK_BYTES = 256 * 2**20


def _rows_per_chunk(n_rows: int, vocab_size: int, device: torch.device) -> int:
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return min(n_rows, max(1, budget // (4 * vocab_size)))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device: torch.device, autocast=contextlib.nullcontext):
    """Mean next-token loss and accuracy over every target of every validation window (each scored once).

    The model runs eagerly (`model.forward`, not `model(...)`), also when `model.compile()` compiled it for
    training: under no_grad, in eval mode and on the ragged last batch, torch.compile compiles twice more, which
    took ~20 s of a 30-step run on an H200 (docs/performance.md, "On H200s"), more than an eager pass over the
    validation set."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    # One autocast region for the whole evaluation: autocast keeps each weight's cast until the region ends, so
    # every weight is cast once, not once per batch. The loss is computed outside autocast, in fp32.
    with autocast():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
            logits = model.forward(inputs).logits.flatten(0, 1)
            rows = _rows_per_chunk(len(targets), logits.shape[-1], device)
            with torch.autocast(device.type, enabled=False):
                for first in range(0, len(targets), rows):
                    chunk, chunk_targets = logits[first : first + rows].float(), targets[first : first + rows]
                    total_loss += F.cross_entropy(chunk, chunk_targets, reduction="sum").double()
                    # max's indices are argmax's (the first maximum), at a quarter of argmax's time on a CPU
                    correct += (chunk.max(-1).indices == chunk_targets).sum()
            count += targets.numel()
    model.train(was_training)
    loss = (total_loss / max(count, 1)).item()
    return {
        "val/loss": loss,
        "val/accuracy": correct.item() / max(count, 1),
        "val/perplexity": math.exp(min(loss, 20.0)),
        "val/tokens": count,
    }
