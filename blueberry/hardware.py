"""What this machine can do: device and precision choices made before training."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16: bf16 on Ampere+ and bf16-capable CPUs, fp16 (+GradScaler) on T4/Volta."""
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("train.precision 'fp16' needs a CUDA GPU (use 'bf16' or 'fp32' on CPU)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16"
        return "fp16" if major >= 7 else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"
