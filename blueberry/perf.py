"""Throughput accounting: training FLOPs per token, the device's peak FLOP/s, and MFU.

MFU = achieved FLOP/s / peak FLOP/s, with achieved = FLOPs per token × tokens/s. FLOPs follow the PaLM
convention (Chowdhery et al. 2022, arXiv:2204.02311, appendix B): 6 × active matmul parameters + 12 × layers
× heads × head_dim × seq_len, i.e. the forward (2 FLOPs per multiply-add) plus a backward twice as costly,
attention counted without the causal saving. Routed experts count only the top_k a token visits. GPU peaks
come from the data sheet table in `blueberry.hardware`; a CPU's peak is measured (a GEMM ceiling), since no
table knows a 2-core VM's share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from blueberry.data.cache import cache_root
from blueberry.fileio import read_json, write_json_atomic
from blueberry.hardware import Preset, bf16_emulated, cpu_supports_bf16, detect_cpu

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMULATED_BF16_SIZES = (128, 256)


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per token (forward + backward)."""

    matmul: float  # 6 × active matmul parameters
    attention: float  # 6 × layers × T × heads × (qk + v head dims): the score and value products
    active_matmul_params: int

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def flops_per_token(model, seq_len: int) -> Flops:
    """Count from the modules (a BlueberryLM): every ≥2-D weight is a matmul (the tied embedding once, as the LM
    head); each attention module counts its own score and value products.

    A routed expert's weights are scaled by top_k / n_experts, since each token visits only top_k of them.
    """
    scale = {id(p): ffn.top_k / ffn.n_experts for ffn in model.routed_ffns() for p in ffn.routed_experts().parameters()}
    attention = model.attention_flops(seq_len)
    active = sum(p.numel() * scale.get(id(p), 1.0) for p in model.parameters() if p.ndim >= 2)
    return Flops(matmul=6 * active, attention=attention, active_matmul_params=round(active))


# --- peak FLOP/s --------------------------------------------------------------------------------------------


def measure_gemm_ceiling(
    precision: str, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5, warmup: int = 2
) -> float:
    """Best FLOP/s of square matmuls over `sizes` and repeats: what this CPU (or GPU) reaches on pure GEMM.

    The best, not the median: other processes only ever slow a GEMM down, and a ceiling is the most it can do.
    Where bf16 is emulated (a CPU without AMX or AVX512-BF16) a 1,024² bf16 product takes seconds and small
    ones run fastest (AVX2 EPYC, 1 thread: 2.6 GFLOP/s at 128², 0.8 at 1,024²): it is measured at 128² and 256².
    """
    if precision == "bf16" and not cpu_supports_bf16():
        sizes = EMULATED_BF16_SIZES
    dtype = PRECISION_DTYPES[precision]
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(warmup):
            a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def ceiling_key(precision: str) -> str:
    cpu = detect_cpu()
    return f"{cpu.model}|threads={torch.get_num_threads()}|torch={torch.__version__}|{precision}"


def ceiling_cache_path():
    return cache_root() / "gemm_ceiling.json"


def read_ceilings() -> dict[str, Any]:
    return read_json(ceiling_cache_path()) or {}


def save_ceiling(precision: str, flops: float) -> None:
    """Remember a careful measurement (from `blueberry bench --ceiling`) for later runs' MFU."""
    path = ceiling_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = read_ceilings()
    entries[ceiling_key(precision)] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(path, entries)


QUICK_CEILING = "quick GEMM ceiling at start"  # peak_flops' source for a ceiling a run measured itself


def peak_flops(device: torch.device, precision: str, preset: Preset) -> tuple[float | None, str]:
    """Peak FLOP/s for MFU and its source: the GPU table, or this CPU's GEMM ceiling (cached, else measured now)."""
    if device.type == "cuda":
        tflops = preset.peak(precision)  # fp32 at the TF32 peak where train/device.py switches TF32 on
        if tflops is None:
            return None, f"no {precision} peak in the table for {preset.name}"
        return tflops * 1e12, f"data sheet ({preset.name}, {preset.peak_kind(precision)})"
    if bf16_emulated(device, precision):
        # the quickstart's bf16 model reached 127 % of an emulated ceiling (`make bench`, AVX2 EPYC): a meaningless MFU
        return None, "bf16 is emulated on this CPU, which has no AMX or AVX512-BF16: no MFU"
    cached = read_ceilings().get(ceiling_key(precision))
    if cached:
        return cached["flops"], f"measured GEMM ceiling ({cached['measured_at']})"
    # A quick one-size measurement (~0.2 s): noisier than `blueberry bench --ceiling`, which caches a careful one.
    return measure_gemm_ceiling(precision, sizes=(1024,), repeats=3, warmup=1), QUICK_CEILING
