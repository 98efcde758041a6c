"""What this machine can do, and what a run should choose on it.

GPUs are found through NVML (`nvidia-ml-py`), the CPU through /proc/cpuinfo. No GPU, no driver or no NVML
library means the CPU path, never an error. A GPU model maps to a preset: its native precision, its dense peak
FLOP/s (for MFU) and a rental price (for the run's cost).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from blueberry.gpu_monitor import mig_board, nvml_session, nvml_text, visible_handles
from blueberry.prices import (
    LIST_PRICES,
    PRICE_ENV,
    PRICE_TABLE_ENV,
    names_words,
    read_price,
    read_price_table,
    table_price,
)
from blueberry.threads import usable_cores


class NotRunnableHere(ValueError):
    """A valid spec that asks for what this machine or this launch lacks (a CUDA device where there is none, a
    batch that does not split over the ranks): the input's problem, said as such (exit 2), where any other
    ValueError in a run is a bug and keeps its traceback."""


@dataclass(frozen=True)
class Preset:
    """One kind of device: its native precision, peaks and price, and the largest micro-batch 'auto' tries."""

    name: str
    match: tuple[str, ...]  # every one of these must appear in the NVML name (case-insensitive)
    # the precision the GPU computes fastest in, whose peak a projection to this GPU scales by (gpu_check's
    # projection); 'auto' reads the running GPU's compute capability instead (`precision_for`), to the same effect
    precision: str
    peak_tflops: dict[str, float]  # dense (no sparsity) peak per precision, from the vendor's data sheet
    usd_per_hour: float | None  # typical rental price of one device; override with train.price_per_hour
    max_micro_batch: int  # upper bound for batch_size 'auto' (the memory probe may pick less)
    source: str = ""  # the document the peaks come from
    board: str = ""  # for a MIG slice, the whole GPU's preset; its peaks and price are `share` of that one's
    share: float = 1.0
    device_name: str = ""  # the GPU's own name (NVML's, CUDA's), which a price table's rows are matched against

    def peak_kind(self, precision: str) -> str:
        """Which data-sheet peak a run in `precision` gets: fp32 matmuls run as TF32 where the GPU has it."""
        return "tf32" if precision == "fp32" and "tf32" in self.peak_tflops else precision

    def peak(self, precision: str) -> float | None:
        """Data-sheet TFLOP/s of a run in `precision` (see `peak_kind`)."""
        return self.peak_tflops.get(self.peak_kind(precision))


# The one table of data-sheet peaks: dense tensor-core figures (fp16/bf16 with fp32 accumulate; the data sheets
# print "with sparsity" figures, twice these), TF32 tensor-core figures (what an fp32 run gets on Ampere+, where
# `enable_tf32` switches it on) and plain fp32. Prices: prices.LIST_PRICES; they drift, so the run records which
# price it used and where it came from. Order matters: the first preset whose words all match wins.
PRESETS: tuple[Preset, ...] = (
    Preset(
        "T4",
        ("t4",),
        "fp16",
        {"fp16": 65.0, "fp32": 8.1},
        LIST_PRICES["T4"],
        64,
        "NVIDIA T4 Tensor Core GPU data sheet",
    ),
    Preset(
        "RTX 4090",
        ("4090",),
        "bf16",
        {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
        LIST_PRICES["RTX 4090"],
        128,
        "NVIDIA Ada Lovelace GPU Architecture whitepaper, GeForce RTX 4090 (FP16/BF16 tensor, FP32 accumulate)",
    ),
    Preset(
        "A100",
        ("a100",),
        "bf16",
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        LIST_PRICES["A100"],
        256,
        "NVIDIA A100 Tensor Core GPU data sheet",
    ),
    Preset(
        "H100 PCIe",
        ("h100", "pcie"),
        "bf16",
        {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
        LIST_PRICES["H100 PCIe"],
        256,
        "NVIDIA H100 Tensor Core GPU data sheet (PCIe)",
    ),
    Preset(
        "H100 NVL",
        ("h100", "nvl"),
        "bf16",
        {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
        LIST_PRICES["H100 NVL"],
        256,
        "NVIDIA H100 Tensor Core GPU data sheet (NVL)",
    ),
    Preset(
        "H100",
        ("h100",),
        "bf16",
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
        LIST_PRICES["H100"],
        256,
        "NVIDIA H100 Tensor Core GPU data sheet (SXM)",
    ),
    Preset(
        "GH200",
        ("gh200",),
        "bf16",
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
        LIST_PRICES["GH200"],
        256,
        "NVIDIA GH200 Grace Hopper Superchip data sheet (its Hopper GPU's dense peaks are the H100 SXM's)",
    ),
    Preset(
        "H200 NVL",
        ("h200", "nvl"),
        "bf16",
        {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
        LIST_PRICES["H200 NVL"],
        256,
        "NVIDIA H200 Tensor Core GPU data sheet (NVL)",
    ),
    Preset(
        "H200",
        ("h200",),
        "bf16",
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
        LIST_PRICES["H200"],
        256,
        "NVIDIA H200 Tensor Core GPU data sheet (SXM)",
    ),
)
# CPU peaks are measured (`blueberry bench --ceiling`), not tabulated. On CPU a bigger micro-batch stops
# paying off long before memory runs out, so 'auto' keeps it moderate.
CPU_PRESET = Preset("CPU", (), "fp32", {}, None, 32)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int  # usable by this process (threads.usable_cores: affinity, cgroup limit), not the host's total
    torch_threads: int
    bf16: bool  # AVX512-BF16 or AMX: bf16 autocast pays off
    amx: bool


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mb: float
    compute_capability: tuple[int, int]
    driver: str


@dataclass
class HardwareInfo:
    cpu: CpuInfo
    gpus: list[GpuInfo] = field(default_factory=list)
    nvml: str = "not queried"  # how GPU detection went: "ok", or why there are no GPUs
    cuda_available: bool = False

    @property
    def preset(self) -> Preset:
        return preset_for(self.gpus[0].name) if self.gpus else CPU_PRESET

    def to_dict(self) -> dict:
        out = asdict(self)
        out["preset"] = self.preset.name
        return out


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name)), None)


def cpu_supports_bf16(flags: list[str] | None = None) -> bool:
    """True on CPUs with native bf16 (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    flags = (_cpuinfo_field("flags") or "").split() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_emulated(device: torch.device, precision: str) -> bool:
    """bf16 on a CPU without native bf16: every product is emulated (20-90x slower than fp32, small ones fastest),
    so no GEMM ceiling is a peak to compare a model with."""
    return device.type == "cpu" and precision == "bf16" and not cpu_supports_bf16()


def detect_cpu() -> CpuInfo:
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    cores = usable_cores()
    flags = (_cpuinfo_field("flags") or "").split()
    return CpuInfo(model, cores, torch.get_num_threads(), cpu_supports_bf16(flags), "amx_bf16" in flags)


def detect_gpus(ask_cuda: bool = False) -> tuple[list[GpuInfo], str]:
    """The NVIDIA GPUs this process may use, through NVML, numbered as CUDA numbers them (CUDA_VISIBLE_DEVICES
    applied; a MIG slice named after its board, as CUDA names it), and how detection went. Any NVML failure means
    no GPUs, not an error. CUDA's own numbering needs CUDA initialised: by torch already, or with `ask_cuda`, for a
    caller that uses CUDA anyway; else NVML's order stands in for it (`gpu_monitor.visible_handles`)."""
    try:
        with nvml_session() as pynvml:
            return _query_gpus(pynvml, ask_cuda)
    except ImportError:
        return [], "nvidia-ml-py not installed"
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
        return [], f"NVML unavailable: {exc}"


def _query_gpus(pynvml, ask_cuda: bool) -> tuple[list[GpuInfo], str]:
    """`detect_gpus` within an NVML session; a failing query also means no GPUs."""
    try:
        driver = nvml_text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index, handle in enumerate(visible_handles(pynvml, ask_cuda)):
            name, board = nvml_text(pynvml.nvmlDeviceGetName(handle)), mig_board(pynvml, handle)
            if board is not None:  # a MIG slice: NVML may name the profile alone ("MIG 1g.10gb"), CUDA adds the board
                board_name = nvml_text(pynvml.nvmlDeviceGetName(board))
                name = name if board_name in name else f"{board_name} {name}"
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name,
                    memory_mb=pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20,
                    compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(board or handle)),
                    driver=driver,
                )
            )
        return gpus, "ok"
    except Exception as exc:
        return [], f"NVML query failed: {exc}"


def detect(ask_cuda: bool = False) -> HardwareInfo:
    """This machine's CPU and GPUs (`detect_gpus`, whose `ask_cuda` this passes on)."""
    gpus, why = detect_gpus(ask_cuda)
    return HardwareInfo(detect_cpu(), gpus, why, torch.cuda.is_available())


# A laptop GPU bears its desktop namesake's number ("NVIDIA GeForce RTX 4090 Laptop GPU") but is a smaller chip at
# lower clocks and power (the 4090 Laptop: an AD103 with 9,728 CUDA cores, the desktop's AD102 16,384), and is not
# rented by the hour: the desktop board's peaks and price are not its.
MOBILE_WORDS = ("laptop", "mobile", "max-q")


def preset_for(gpu_name: str) -> Preset:
    """The preset whose match words are all words of the GPU's name; unknown GPUs, laptop ones included
    (`MOBILE_WORDS`), get a generic fp32 preset (no peaks, no list price). A MIG slice gets its share of the
    board's peaks and price, and of a price table's row for the board (see `mig_slice`)."""
    mobile = any(names_words(gpu_name, (word,)) for word in MOBILE_WORDS)
    preset = None if mobile else next((p for p in PRESETS if names_words(gpu_name, p.match)), None)
    if preset is None:
        preset = Preset(MIG_PROFILE.split(gpu_name)[0].strip(), (), "fp32", {}, None, 64)
    if (slice_ := mig_slice(gpu_name)) is None:
        return replace(preset, device_name=gpu_name)
    profile, used, total = slice_
    return replace(
        preset,
        device_name=gpu_name,
        name=f"{preset.name} MIG {profile}",
        peak_tflops={kind: tflops * used / total for kind, tflops in preset.peak_tflops.items()},
        usd_per_hour=None if preset.usd_per_hour is None else preset.usd_per_hour * used / total,
        source=f"{preset.source}, × {used}/{total} for a MIG {profile} slice",
        board=preset.name,
        share=used / total,
    )


# CUDA names a MIG slice "<board> MIG 3g.40gb" (3 of the board's compute slices, 40 GB), or "MIG 1c.3g.40gb" for a
# compute instance of 1 slice in that GPU instance; NVIDIA's MIG user guide, "MIG Device Names".
MIG_PROFILE = re.compile(r"\bMIG ((?:(\d+)c\.)?(\d+)g\.\d+gb)\b", re.IGNORECASE)


def mig_slice(gpu_name: str) -> tuple[str, int, int] | None:
    """A MIG slice's profile, its compute slices and the board's (4 on an A30, 7 on the A100, H100, H200 and
    newer); None for a whole GPU. A share of compute slices, not of SMs: an A100's 1g slice has 14 of its 108 SMs,
    13 % where 1/7 is 14 %, so a slice's peak and MFU are approximate."""
    match = MIG_PROFILE.search(gpu_name)
    if match is None:
        return None
    profile, compute_instance, gpu_instance = match.groups()
    return profile, int(compute_instance or gpu_instance), 4 if "a30" in gpu_name.lower() else 7


def precision_for(compute_capability: tuple[int, int] | None, cpu_bf16: bool) -> str:
    """bf16 on Ampere+ (cc >= 8.0) and bf16-capable CPUs; fp16 + GradScaler on Volta/Turing (T4); else fp32."""
    if compute_capability is None:
        return "bf16" if cpu_bf16 else "fp32"
    major = compute_capability[0]
    if major >= 8:
        return "bf16"
    return "fp16" if major >= 7 else "fp32"


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise NotRunnableHere("train.device is 'cuda' but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16: bf16 on Ampere+ and bf16-capable CPUs, fp16 (+GradScaler) on T4/Volta."""
    if requested == "fp16" and device.type != "cuda":
        raise NotRunnableHere("train.precision 'fp16' needs a CUDA GPU (use 'bf16' or 'fp32' on CPU)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return precision_for(torch.cuda.get_device_capability(device), False)
    return precision_for(None, cpu_supports_bf16())


# torch.compile pays on a GPU only over enough micro-steps. The study's runs (1,500 micro-steps of 16 × 256 tokens,
# bf16) on an H200, a fresh process and a cold compile cache each: compiling cost 15 s (dense) and 31 s (MoE) in
# the first steps and ~7 s around the loop, and saved 7-10 ms per micro-step after; the whole run took 49 s against
# 36 s eager (dense), 75 s against 52 s (MoE). It pays after ~3,000-4,000 micro-steps (README, On a GPU).
# With Inductor's caches warm (the same shapes compiled before) it paid at 1,500: training 16 s against 27 s eager
# (dense), 34 s against 48 s (MoE); but a run cannot tell whether the cache holds its shapes, so 'auto' assumes cold.
COMPILE_MIN_MICRO_STEPS = 4_000


def resolve_compile(requested: bool | str, device: torch.device, micro_steps: int) -> bool:
    """torch.compile or not. 'auto': on CUDA for runs of at least COMPILE_MIN_MICRO_STEPS micro-steps (optimizer
    steps × accumulation), where the fused kernels win back the compile time; never on CPU, where compiling takes
    minutes and `make bench` measured no gain."""
    if requested != "auto":
        return bool(requested)
    return device.type == "cuda" and micro_steps >= COMPILE_MIN_MICRO_STEPS


# --- cost -------------------------------------------------------------------------------------------------


def price_per_hour(spec_price: float | None, preset: Preset) -> tuple[float | None, str]:
    """USD per device-hour and where it came from.

    In order: the spec's train.price_per_hour, $BLUEBERRY_PRICE_PER_HOUR (a number), $BLUEBERRY_GPU_PRICES (the
    report's table: a JSON object of GPU name -> price, or a path to one), then the preset's list price.
    """
    if spec_price is not None:
        return spec_price, "spec"
    env = os.environ.get(PRICE_ENV)
    if env:
        return read_price(env, PRICE_ENV), PRICE_ENV
    table = os.environ.get(PRICE_TABLE_ENV)
    if table and preset.device_name:  # a GPU (the CPU has no name to match)
        found = table_price(preset.device_name, read_price_table(table, PRICE_TABLE_ENV), preset.share)
        if found is not None:  # a MIG slice priced from its board's row pays its share
            price, row, factor = found
            return price, f"{PRICE_TABLE_ENV} ({row})" + (f" × {factor:.3g}" if factor != 1 else "")
    if preset.usd_per_hour is not None:
        return preset.usd_per_hour, f"table ({preset.name})"
    return None, "no price for this device; set train.price_per_hour to get a cost"


def run_cost(price: float | None, wall_s: float, devices: int) -> dict:
    """The cost/* summary keys: price × wall-clock hours × devices, or None when no price applies."""
    device_hours = wall_s / 3600 * devices
    return {
        "cost/usd": None if price is None else price * device_hours,
        "cost/usd_per_hour": price,
        "cost/device_hours": device_hours,
    }


# --- batch_size: auto --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int  # windows per rank per micro-step
    grad_accum: int
    effective_batch: int  # windows per optimizer step, all ranks
    how: str


def choose_micro_batch(per_rank: int, fits: Callable[[int], bool], cap: int) -> int:
    """The largest divisor of `per_rank` (≤ cap) that `fits`; 1 if none does (accumulation then does the rest)."""
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if micro <= cap and fits(micro):
            return micro
    return 1


def resolve_batch(
    batch_size: int | str, grad_accum: int, effective_batch: int | None, world: int, fits, cap: int
) -> BatchChoice:
    """Turn the spec's batch settings into (micro-batch, accumulation); 'auto' keeps `effective_batch` fixed."""
    if batch_size != "auto":
        return BatchChoice(batch_size, grad_accum, batch_size * grad_accum * world, "spec")
    if effective_batch % world:
        raise NotRunnableHere(f"train.effective_batch ({effective_batch}) is not divisible by the {world} ranks")
    per_rank = effective_batch // world
    micro = choose_micro_batch(per_rank, fits, cap)
    return BatchChoice(micro, per_rank // micro, effective_batch, "auto")


def estimate_train_bytes(
    params: int, active_width: int, d_model: int, n_layers: int, n_heads: int, vocab: int, seq_len: int, micro: int
) -> int:
    """A deliberately generous training-memory estimate (bytes), for choosing a micro-batch without a probe.

    Weights, grads and up to three optimizer states in fp32, plus activations kept for backward: per token and
    layer ~16·d (attention in/out, norms, residuals, dropout masks) + 4·(active FFN width) + heads·T
    (attention scores, if the kernel materialises them), and the logits with their gradient; all in fp32, ×1.5.
    """
    tokens = micro * seq_len
    per_token_layer = 16 * d_model + 4 * active_width + n_heads * seq_len
    activations = tokens * (n_layers * per_token_layer + 3 * vocab) * 4
    return int(1.5 * (params * 4 * 5 + activations))


def memory_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


GPU_MEMORY_HEADROOM = 0.85  # the share of a GPU's memory a batch size may plan to use (the rest: fragmentation)


def cuda_probe_fits(model, vocab_size: int, seq_len: int, autocast, device: torch.device, chunked_loss=True):
    """A `fits(micro)` that runs one forward+backward at that micro-batch and checks the peak memory.

    Optimizer states do not exist yet during the probe, so three fp32 copies of the parameters are added. The probe
    leaves the CPU's and the device's random state as it found them: its tokens, dropout masks and router noise
    would otherwise shift the run's random stream by however many sizes were tried.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_bytes = 3 * 4 * sum(p.numel() for p in model.parameters())

    def fits(micro: int) -> bool:
        with torch.random.fork_rng(devices=[device], device_type="cuda"):
            return probe(micro)

    def probe(micro: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            tokens = torch.randint(vocab_size, (micro, seq_len + 1), device=device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            with autocast():  # the training loss path, so the probe sees the real peak
                out = model(inputs, targets if chunked_loss else None)
            loss = out.loss if chunked_loss else F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            peak = torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return peak + optimizer_bytes <= GPU_MEMORY_HEADROOM * total

    return fits
