"""Getting work onto the device: the process's settings for it, TF32 matmuls on Ampere+, and host batches copied
without a stall."""

from __future__ import annotations

import torch

from blueberry.allocator import keep_freed_memory


def prepare_process(device: torch.device) -> None:
    """Process-wide settings for training on `device` (a run and the bench alike): denormal floats flushed (they
    take a slow path on CPUs: steps became many times slower) and, on a CPU, freed memory kept, so a step's large
    temporaries reuse their pages (allocator.py)."""
    torch.set_flush_denormal(True)
    if device.type == "cpu":
        keep_freed_memory()


def enable_tf32(device: torch.device) -> bool:
    """TF32 for fp32 matmuls and convolutions on Ampere+ GPUs (cc >= 8.0); True if it was switched on.

    Under bf16/fp16 autocast the big matmuls are not fp32 anyway; what stays fp32 (the optimizer's, Muon's
    fp32 parts, an fp32 run) gets the tensor cores, at TF32's 10-bit mantissa.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`: through pinned memory and `non_blocking` on CUDA, so the copy does not make the
    host wait for the GPU (a copy from pageable memory is synchronous)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)
