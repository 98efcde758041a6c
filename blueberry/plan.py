"""What a run decides before it trains, and the build stage every entry point shares.

`build` turns a spec into a device, a model and a RunPlan (precision, micro-batch, FLOPs per token, peak
FLOP/s, price); `blueberry run`, `blueberry bench` and `blueberry doctor` all go through it. This module sits
above `hardware` (what the machine is), `perf` (FLOP accounting) and `models`; none of them imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from blueberry import distributed
from blueberry.hardware import (
    CPU_PRESET,
    GPU_MEMORY_HEADROOM,
    BatchChoice,
    HardwareInfo,
    NotRunnableHere,
    cuda_probe_fits,
    estimate_train_bytes,
    memory_available_bytes,
    preset_for,
    price_per_hour,
    resolve_batch,
    resolve_compile,
    resolve_precision,
)
from blueberry.models import ParamCounts, assert_causal, build_model, count_parameters, registry
from blueberry.perf import flops_per_token, peak_flops
from blueberry.spec import RunSpec
from blueberry.train.trainer import autocast_for


@dataclass
class RunPlan:
    """Everything a run decides about the hardware, recorded in its header under `hardware`."""

    device: str
    precision: str
    threads: int
    preset: str
    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    world_size: int
    batch: BatchChoice
    compile: bool
    peak_flops: float | None
    peak_source: str
    price_per_hour: float | None
    price_source: str
    flops_per_token: float | None = None

    def header(self) -> dict:
        out = asdict(self)
        out["batch"] = asdict(self.batch)
        return out

    def apply(self, spec):
        """The spec with batch_size 'auto' replaced by the chosen micro-batch and accumulation."""
        train = spec.train.model_copy(
            update={"batch_size": self.batch.micro_batch, "grad_accum": self.batch.grad_accum, "effective_batch": None}
        )
        return spec.model_copy(update={"train": train})


def plan_run(
    spec, device: torch.device, model, vocab_size: int, world_size: int = 1, probe: bool = True, peak: bool = True
) -> RunPlan:
    """Decide precision, micro-batch, peak FLOP/s and price for `spec` on `device`.

    batch_size 'auto': on a GPU a real forward+backward probe (probe=True) or the estimate, on CPU the estimate
    against half the available RAM, capped by the preset. peak=False skips finding the peak FLOP/s (on CPU a
    GEMM measurement when none is cached): the bench measures its own.
    """
    precision = resolve_precision(spec.train.precision, device)
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        preset, capability = preset_for(gpu_name), tuple(torch.cuda.get_device_capability(device))
        budget = GPU_MEMORY_HEADROOM * torch.cuda.get_device_properties(device).total_memory
    else:
        gpu_name, preset, capability = None, CPU_PRESET, None
        budget = 0.5 * (memory_available_bytes() or 8 * 2**30)
    m = spec.model
    active_width = (m.top_k + m.n_shared_experts) * m.expert_d_ff if m.is_moe else m.d_ff
    params = count_parameters(model).total

    def estimate_fits(micro: int) -> bool:
        need = estimate_train_bytes(
            params, active_width, m.d_model, m.n_layers, m.n_heads, vocab_size, spec.data.seq_len, micro
        )
        return need <= budget

    fits = estimate_fits
    if device.type == "cuda" and probe and spec.train.batch_size == "auto":
        autocast = autocast_for(device, precision)
        fits = cuda_probe_fits(
            model.to(device), vocab_size, spec.data.seq_len, autocast, device, chunked_loss=spec.train.chunked_loss
        )
    t = spec.train
    batch = resolve_batch(t.batch_size, t.grad_accum, t.effective_batch, world_size, fits, preset.max_micro_batch)
    if batch.how == "auto":  # each rank chose from its own memory; all take the smallest choice, so every rank
        # runs the same micro-steps on its slice of one global draw (TrainSampler) and the record's batch is theirs
        micro = distributed.smallest_across_ranks(batch.micro_batch)  # a divisor of the per-rank batch, as all are
        batch = BatchChoice(micro, batch.effective_batch // world_size // micro, batch.effective_batch, batch.how)
    peak_value, peak_source = peak_flops(device, precision, preset) if peak else (None, "not measured")
    price, price_source = price_per_hour(t.price_per_hour, preset)
    compiled = resolve_compile(t.compile, device, t.steps * batch.grad_accum)
    experts = spec.model.experts_implementation
    routed = registry.FFNS[spec.model.ffn].routed
    if compiled and routed and experts in ("grouped", "grouped_mm") and precision != "bf16":
        # torch's compiler traces grouped_mm only for bf16 inputs: the first compiled step would fail
        raise NotRunnableHere(
            f"model.experts_implementation '{experts}' cannot be compiled in {precision} (torch.compile traces "
            "grouped_mm in bf16 only): use 'sorted' or 'auto', train.precision bf16, or train.compile false"
        )
    return RunPlan(
        device=str(device),
        precision=precision,
        threads=torch.get_num_threads(),
        preset=preset.name,
        gpu_name=gpu_name,
        compute_capability=capability,
        world_size=world_size,
        batch=batch,
        compile=compiled,
        peak_flops=peak_value,
        peak_source=peak_source,
        price_per_hour=price,
        price_source=price_source,
        flops_per_token=flops_per_token(model, spec.data.seq_len).total,
    )


@dataclass
class Build:
    """The build stage's result: a model on its way to training, and what the run decided around it."""

    spec: RunSpec  # with batch_size 'auto' made concrete (the run record keeps the spec as written)
    device: torch.device
    precision: str
    model: torch.nn.Module
    params: ParamCounts
    plan: RunPlan


def build(
    spec: RunSpec,
    device: torch.device,
    vocab_size: int,
    world_size: int = 1,
    *,
    check_causal: bool = True,
    probe: bool = True,
    peak: bool = True,
) -> Build:
    """Seed, build the model, check it is causal, plan the run on `device`, and compile it if the spec asks.

    The model's weights come from `spec.seed` alone: this draws from the torch RNG in the same order
    whichever entry point calls it.
    """
    precision = resolve_precision(spec.train.precision, device)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, vocab_size)
    if check_causal:  # a model that sees the future learns nothing real: it never trains here
        assert_causal(model, vocab_size, seq_len=min(32, spec.data.seq_len))
    params = count_parameters(model)
    plan = plan_run(spec, device, model, vocab_size, world_size, probe=probe, peak=peak)
    if plan.compile:  # train.compile 'auto' resolved for this device
        # In place: parameter names and checkpoints stay those of the plain model. A distributed run wraps this
        # compiled module in DDP, the order PyTorch's "Where to apply torch.compile?" page gives for DDP.
        model.compile()
    return Build(plan.apply(spec), device, precision, model, params, plan)


def format_doctor(info: HardwareInfo, plan: RunPlan, spec_name: str) -> str:
    cpu = info.cpu
    bf16 = "yes (AMX)" if cpu.amx else ("yes (AVX512-BF16)" if cpu.bf16 else "no")
    lines = [f"CPU      {cpu.model}: {cpu.cores} usable cores, torch threads {cpu.torch_threads}, native bf16 {bf16}"]
    if info.gpus:
        for gpu in info.gpus:
            cc = ".".join(map(str, gpu.compute_capability))
            lines.append(
                f"GPU {gpu.index}    {gpu.name}: {gpu.memory_mb / 1024:.1f} GiB, compute capability {cc}, "
                f"driver {gpu.driver}, preset {preset_for(gpu.name).name}"
            )
    else:
        lines.append(f"GPUs     none ({info.nvml})")
    lines.append(f"CUDA     {'available' if info.cuda_available else 'not available'} in torch {torch.__version__}")
    b = plan.batch
    scaler = " + GradScaler" if plan.precision == "fp16" else ""
    peak = "unknown" if plan.peak_flops is None else f"{plan.peak_flops / 1e12:.3f} TFLOP/s"
    price = "cost not applicable" if plan.price_per_hour is None else f"${plan.price_per_hour:.2f}/device-hour"
    lines += [
        f"A run of {spec_name} here would use:",
        f"  device     {plan.device} (preset {plan.preset}), {plan.world_size} process(es)",
        f"  precision  {plan.precision}{scaler}",
        f"  batch      {b.micro_batch} windows per micro-step × {b.grad_accum} accumulation × {plan.world_size} "
        f"rank(s) = {b.effective_batch} per optimizer step ({b.how})",
        f"  compile    {'torch.compile' if plan.compile else 'eager'}",
        f"  FLOPs      {plan.flops_per_token / 1e6:.1f} MFLOP per trained token",
        f"  peak       {peak} ({plan.peak_source})",
        f"  price      {price} ({plan.price_source})",
    ]
    return "\n".join(lines)
