"""In-process checks: what the machine is, the speed of every Experiment 1 preset, memory, batch 'auto', and the
projection of Experiment 1. Each measures through the real trainer (`blueberry.bench.measure`) on synthetic
tokens at `Context.shape` (the study shape on a GPU, a tiny one in tests)."""

from __future__ import annotations

import gc
import time

import torch

from blueberry.bench.measure import SyntheticData, measure_throughput
from blueberry.gpu_check.projection import Experiment, compute_flops_per_s, project, read_experiment, run_length
from blueberry.gpu_check.suite import CheckFailed, CheckSkipped, Context
from blueberry.hardware import (
    CPU_PRESET,
    Preset,
    detect,
    preset_for,
    price_per_hour,
    resolve_compile,
    resolve_precision,
)
from blueberry.models import build_model, registry
from blueberry.overrides import load_spec
from blueberry.perf import peak_flops
from blueberry.plan import format_doctor, plan_run
from blueberry.train.trainer import AUTOCAST_DTYPES

# The study shape: 512d / 3 layers / 8 heads come from Experiment 1's spec; seq 256, micro-batch 16 and the
# SmolLM tokenizer's 49,152-token vocabulary (as synthetic tokens) are set here. One micro-batch per step.
STUDY_SHAPE = ["--data.vocab_size=49152", "--data.seq_len=256", "--train.batch_size=16", "--train.grad_accum=1"]


def preset_of(device: torch.device):
    return preset_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else CPU_PRESET


def main_precision(device: torch.device) -> str:
    """bf16, the study's precision on Ampere+; fp16 on older GPUs, which lack fast bf16; on a CPU what
    `train.precision: auto` picks (bf16 with AMX or AVX512-BF16, fp32 where bf16 is emulated, 20-90x slower)."""
    if device.type == "cpu":
        return resolve_precision("auto", device)
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "fp16"
    return "bf16"


def study_spec(context: Context, overrides: list[str]):
    """Experiment 1's spec at the study shape, with `overrides` (a preset's, and the check's own)."""
    extra = [*context.shape, *overrides, f"--train.device={context.device.type}"]
    return load_spec(read_experiment().base_spec, extra)


def _peak_memory_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(context: Context, overrides: list[str], warmup: int = 2, timed: int = 4) -> dict:
    """tokens/s, MFU against the data-sheet peak (a measured ceiling on CPU) and peak memory of one configuration."""
    spec = study_spec(context, overrides)
    _peak_memory_reset(context.device)
    if spec.train.compile is True:
        torch._dynamo.reset()  # a fresh compile per preset: no stale graphs, no recompile limit across presets
    figures = measure_throughput(spec, warmup, timed)
    if context.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(context.device) / 2**20
    else:
        peak_mb = figures["peak_rss_mb"]
    peak, peak_source = peak_flops(context.device, figures["precision"], preset_of(context.device))
    mfu = figures["tflops"] * 1e12 / peak if peak else None
    _peak_memory_reset(context.device)
    return {**figures, "peak_memory_mb": peak_mb, "mfu": mfu, "peak_source": peak_source}


def _summary(m: dict) -> str:
    mfu = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
    return f"{m['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak {m['peak_memory_mb']:,.0f} MB"


def measure_presets(context: Context, box_s: float, overrides: list[str], presets=None, slowest: float = 0.0) -> dict:
    """Every Experiment 1 preset (or `presets`) with `overrides`; a preset starts only if the slowest one so far
    (`slowest`: of earlier measurements, else the first always runs) still fits in the time box, so the box holds.
    A preset that fails (out of memory, a CUDA or compiler error) is that preset's result; the others are kept."""
    started = time.monotonic()
    cases, rows = {}, []
    for label, preset_overrides in presets or read_experiment().presets:
        if slowest and time.monotonic() - started + slowest > box_s:  # the first always runs
            rows.append((label, "skipped: time box spent"))
            continue
        case_started = time.monotonic()
        try:
            cases[label] = measure(context, [*preset_overrides, *overrides])
            rows.append((label, _summary(cases[label])))
        except torch.OutOfMemoryError as exc:
            cases[label] = {"error": f"out of memory: {exc}"[:200]}
            rows.append((label, "out of memory"))
        except Exception as exc:  # one preset's crash (CUDA, the compiler) must not lose the others' figures
            cases[label] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append((label, f"failed: {cases[label]['error']}"))
        slowest = max(slowest, time.monotonic() - case_started)
    failed = [label for label, case in cases.items() if "error" in case]
    result = {"rows": rows, "cases": cases}
    if failed:
        error = CheckFailed(f"failed: {', '.join(failed)}")
        error.figures = result
        raise error
    return result


def check_doctor(context: Context, box_s: float) -> dict:
    """The doctor's view and the plan a run of Experiment 1's spec would choose here."""
    info = detect(ask_cuda=True)  # gpu-check uses CUDA anyway: number the GPUs as it does
    spec = study_spec(context, read_experiment().presets[0][1])
    model = build_model(spec.model, spec.data.vocab_size)
    plan = plan_run(spec, context.device, model, spec.data.vocab_size, probe=False)
    text = format_doctor(info, plan, "Experiment 1's spec at the study shape")
    rows = [("device", plan.gpu_name or info.cpu.model), ("preset", plan.preset), ("precision", plan.precision)]
    rows += [("compile", str(plan.compile)), ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")]
    rows.append(("peak", "unknown" if plan.peak_flops is None else f"{plan.peak_flops / 1e12:g} TFLOP/s"))
    return {"rows": rows, "doctor": text, "hardware": info.to_dict(), "plan": plan.header()}


def check_eager(context: Context, box_s: float) -> dict:
    return measure_presets(
        context, box_s, [f"--train.precision={main_precision(context.device)}", "--train.compile=false"]
    )


def check_compiled(context: Context, box_s: float) -> dict:
    """Every preset compiled, the first twice: again after `torch._dynamo.reset()`, Inductor's on-disk caches
    warm, as a sweep's later runs of the same shapes find them (what `compile: auto`'s threshold assumed cold)."""
    started = time.monotonic()
    flags = [f"--train.precision={main_precision(context.device)}", "--train.compile=true"]
    (label, overrides), *others = read_experiment().presets
    first = _measured(context, box_s, flags, [(label, overrides)])
    took = time.monotonic() - started
    cold = first["cases"][label].get("first_step_s")
    if cold is not None and took * 2 <= box_s:  # the warm run takes at most as long as the cold one
        warm = measure(context, [*overrides, *flags])["first_step_s"]
        first["compile_first_steps_s"] = {"preset": label, "cold": cold, "warm": warm}
        said = f"first steps {warm:.1f} s with Inductor's caches warm (cold {cold:.1f} s)"
    else:
        said = "skipped: " + ("the first compile failed" if cold is None else "time box spent")
    first["rows"].append((f"{label} compiled again", said))
    rest = _measured(context, box_s - (time.monotonic() - started), flags, others, slowest=took)
    result = {**first, "rows": first["rows"] + rest["rows"], "cases": {**first["cases"], **rest["cases"]}}
    failed = [name for name, case in result["cases"].items() if "error" in case]
    if failed:  # as measure_presets fails, with every preset's figures
        error = CheckFailed(f"failed: {', '.join(failed)}")
        error.figures = result
        raise error
    return result


def _measured(context: Context, box_s: float, overrides: list[str], presets, slowest: float = 0.0) -> dict:
    """measure_presets' figures, also when a preset failed (they ride on its CheckFailed)."""
    try:
        return measure_presets(context, box_s, overrides, presets, slowest)
    except CheckFailed as exc:
        return exc.figures


def _preset(label: str) -> list[tuple[str, list[str]]]:
    return [p for p in read_experiment().presets if p[0] == label] or read_experiment().presets[:1]


def check_fp16(context: Context, box_s: float) -> dict:
    """The T4 path: fp16 autocast + GradScaler, on the dense preset of the seed's RTX 4090 figure."""
    if context.device.type != "cuda":
        raise CheckSkipped("fp16 + GradScaler needs a CUDA GPU")
    return measure_presets(
        context,
        box_s,
        ["--train.precision=fp16", "--train.compile=false"],
        _preset(registry.preset_for("mla", "mlp").name),
    )


def check_chunked_loss(context: Context, box_s: float) -> dict:
    """Peak memory with the chunked LM-head loss and with full fp32 logits, same preset and precision."""
    precision = f"--train.precision={main_precision(context.device)}"
    ((label, overrides),) = _preset(registry.preset_for("mha", "mlp").name)
    full = measure(context, [*overrides, precision, "--train.compile=false", "--train.chunked_loss=false"], 1, 2)
    chunked = measure(context, [*overrides, precision, "--train.compile=false", "--train.chunked_loss=true"], 1, 2)
    saved = full["peak_memory_mb"] - chunked["peak_memory_mb"]
    rows = [(f"{label} full logits", _summary(full)), (f"{label} chunked", _summary(chunked))]
    rows.append(("memory saved", f"{saved:,.0f} MB"))
    return {"rows": rows, "full": full, "chunked": chunked, "saved_mb": saved}


def grouped_against_sorted(device: torch.device, dtype: torch.dtype) -> float:
    """The largest difference between grouped_mm's outputs and gradients and the sorted dispatch's, relative to
    their largest value, on experts of uneven token counts (not multiples of 8) and one with none."""
    from blueberry.models.feedforward import grouped_dispatch, sorted_dispatch

    gen = torch.Generator().manual_seed(0)
    counts, d, hidden = [7, 0, 13, 41], 64, 128  # token-assignments per expert; feature sizes grouped_mm takes
    shuffled = torch.randperm(sum(counts), generator=gen)
    top_idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[shuffled]
    x = torch.randn(sum(counts), d, generator=gen).to(device, dtype).requires_grad_()
    w_in = (torch.randn(len(counts), hidden, d, generator=gen) / d**0.5).to(device, dtype).requires_grad_()
    w_out = (torch.randn(len(counts), d, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_()
    top_idx, weights = top_idx[:, None].to(device), torch.ones(sum(counts), 1, device=device, dtype=dtype)
    silu = torch.nn.functional.silu
    results = []
    for run in (
        lambda: grouped_dispatch(x, top_idx, weights, w_in, w_out, silu),
        lambda: sorted_dispatch(x, top_idx, weights, len(counts), lambda e, rows: silu(rows @ w_in[e].T) @ w_out[e].T),
    ):
        out = run()
        results.append([out, *torch.autograd.grad(out.float().square().sum(), (x, w_in, w_out))])
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item() for a, b in zip(*results)
    )


def check_experts(context: Context, box_s: float) -> dict:
    """Routed experts: grouped_mm computes what the sorted dispatch does (an empty expert included), then their
    speeds: sorted (one host sync per layer) against grouped_mm (none); 'auto' picks."""
    main = main_precision(context.device)
    dtype = AUTOCAST_DTYPES.get(main, torch.float32)
    try:
        difference = grouped_against_sorted(context.device, dtype)
    except RuntimeError as exc:  # grouped_mm has no kernel for this GPU or dtype (before Ampere, fp16)
        raise CheckFailed(f"grouped_mm does not run here in {main}: {str(exc).splitlines()[0]}") from None
    if difference > (3e-2 if dtype != torch.float32 else 1e-4):
        raise CheckFailed(f"grouped_mm differs from the sorted dispatch by {difference:.1e} of the values ({main})")
    ((label, overrides),) = _preset(registry.preset_for("mha", "glm4_moe").name)
    cases = {}
    for implementation in ("sorted", "grouped"):
        flags = [*overrides, f"--train.precision={main}", "--train.compile=false"]
        cases[implementation] = measure(context, [*flags, f"--model.experts_implementation={implementation}"], 1, 3)
    rows = [("grouped = sorted", f"values and gradients within {difference:.1e} ({main}, an empty expert)")]
    rows += [(f"{label} {name}", _summary(m)) for name, m in cases.items()]
    rows.append(("grouped / sorted", f"{cases['grouped']['tokens_per_s'] / cases['sorted']['tokens_per_s']:.2f}x"))
    return {"rows": rows, "cases": cases, "difference": difference}


def check_batch_auto(context: Context, box_s: float) -> dict:
    """batch_size 'auto' for 4 study micro-batches per step: the micro-batch the probe picks, and steps at it."""
    ((label, overrides),) = _preset(registry.preset_for("mha", "mlp").name)
    effective = 4 * study_spec(context, overrides).train.batch_size
    spec = study_spec(context, [*overrides, "--train.batch_size=auto", f"--train.effective_batch={effective}"])
    data = SyntheticData(spec.data.vocab_size, spec.data.seq_len, n_tokens=10_000)
    model = build_model(spec.model, data.vocab_size)
    plan = plan_run(spec, context.device, model, data.vocab_size, probe=True)
    del model
    chosen = plan.batch
    micro = [*overrides, f"--train.batch_size={chosen.micro_batch}", f"--train.grad_accum={chosen.grad_accum}"]
    try:
        ran = measure(context, micro, 2, 4)  # the projection's second micro-batch size: 4 timed steps, not 1
    except torch.OutOfMemoryError as exc:
        raise CheckFailed(f"out of memory at the chosen micro-batch {chosen.micro_batch}") from exc
    total = (
        torch.cuda.get_device_properties(context.device).total_memory / 2**20 if context.device.type == "cuda" else None
    )
    rows = [("effective batch", str(effective)), ("chosen", f"{chosen.micro_batch} × {chosen.grad_accum} accumulation")]
    memory = f"{ran['peak_memory_mb']:,.0f} MB" + (f" of {total:,.0f} MB" if total else "")
    rows.append((f"{label} at that size", f"{ran['tokens_per_s']:,.0f} tokens/s, peak {memory}, no OOM"))
    return {"rows": rows, "micro_batch": chosen.micro_batch, "grad_accum": chosen.grad_accum, "run": ran}


def compile_cost_s(compiled: dict, eager: dict) -> float:
    """What compiling cost a run: its first steps' time over eager's (measurements from `measure`)."""
    return max(0.0, compiled.get("first_step_s", 0.0) - eager.get("first_step_s", 0.0))


def check_projection(context: Context, box_s: float) -> dict:
    """PROJECTION of Experiment 1 (presets × seeds at the study's steps) from the speeds measured above: per preset,
    eager or compiled as `compile: auto` picks for a run of its length here, a compiled run paying its measured
    compile time (its first steps' time over eager's)."""
    experiment = read_experiment()
    speeds = {
        source: context.results.get(f"throughput_{source}", {}).get("cases", {}) for source in ("eager", "compiled")
    }
    compute, model_row = compute_model(context, speeds["eager"])
    runs, measured, missing = [], {}, []
    for label, overrides in experiment.presets:
        tokens, micro_steps = run_length(experiment, overrides)
        eager, compiled = speeds["eager"].get(label, {}), speeds["compiled"].get(label, {})
        case, how, compile_s = eager, "eager", 0.0
        if resolve_compile("auto", context.device, micro_steps) and "tokens_per_s" in compiled and eager:
            case, how = compiled, "compiled"
            compile_s = compile_cost_s(compiled, eager)
        if "tokens_per_s" not in case:
            missing.append(label)
            continue
        measured[label] = how
        runs.append(
            {"label": label, "tokens": tokens, "tokens_per_s": case["tokens_per_s"], "compile_s": compile_s,
             "seeds": len(experiment.seeds), "compute_share": compute_share(case, compute)}
        )  # fmt: skip
    if missing:
        raise CheckSkipped(f"no measured speed for {', '.join(missing)}")
    startup = context.results.get("blueberry_run", {}).get("startup_s", 0.0)
    preset = preset_of(context.device)
    price, _ = price_per_hour(None, preset)
    result = project(runs, startup, preset, main_precision(context.device), price)
    rows = []
    for row in result["targets"]:
        cost = "n/a (no price)" if row["cost_usd"] is None else f"${row['cost_usd']:.2f} at ${row['usd_per_hour']}/h"
        rows.append((f"PROJECTION {row['gpu']}", f"{row['wall_s'] / 60:.1f} min, {cost} ({row['basis']})"))
    note = f"{result['runs']} runs; start-up {startup:.0f} s per run" + ("" if startup else " (not measured)")
    picked = list(measured.values())
    note += f"; presets as compile: auto runs them: {picked.count('eager')} eager, {picked.count('compiled')} compiled"
    rows.append(("projection basis", note))
    rows.append(model_row)
    swept = project_compiled_sweep(context, experiment, speeds, startup, preset, price)
    rows.append(swept["row"])
    return {"rows": rows, **result, "measured": measured, "runs_projected": runs, "compiled_sweep": swept}


def compute_model(context: Context, eager: dict) -> tuple[float | None, tuple[str, str]]:
    """This GPU's compute speed (FLOP/s; None if not measured) from the dense preset at the study's micro-batch
    (`check_eager`) and at batch 'auto''s (`check_batch_auto`), and the row that says what the projection took."""
    ((label, _),) = _preset(registry.preset_for("mha", "mlp").name)
    small, auto = eager.get(label, {}), context.results.get("batch_auto", {})
    large = auto.get("run", {})
    needed = ("step_s", "tokens_per_step", "flops_per_token")
    flops_s = None
    if all(key in small and key in large for key in needed):
        flops_s = compute_flops_per_s(small, large, auto["grad_accum"])
    if flops_s is None:
        return None, ("projection model", "equal MFU on every GPU: no second micro-batch size to split a step by")
    peak_tflops = preset_of(context.device).peak(main_precision(context.device))  # the data sheet's; None on CPU
    of_peak = f" ({flops_s / 1e12 / peak_tflops:.0%} of the data-sheet peak)" if peak_tflops else ""
    overhead_ms = (small["step_s"] - small["tokens_per_step"] * small["flops_per_token"] / flops_s) * 1e3
    text = (
        f"a micro-step = host overhead + its FLOPs at {flops_s / 1e12:.0f} TFLOP/s{of_peak}, from {label}'s steps "
        f"of {small['tokens_per_step']:,} and {large['tokens_per_step']:,} tokens; {label}'s overhead "
        f"{overhead_ms:.1f} ms a micro-step here, kept on the other GPUs"
    )
    return flops_s, ("projection model", text)


def compute_share(case: dict, flops_s: float | None) -> float:
    """The share of a measured step spent computing at `flops_s`: its achieved FLOP/s over that, at most 1."""
    if flops_s is None or "flops_per_token" not in case:
        return 1.0
    return min(1.0, case["tokens_per_s"] * case["flops_per_token"] / flops_s)


def project_compiled_sweep(
    context: Context, experiment: Experiment, speeds: dict, startup: float, preset: Preset, price: float | None
) -> dict:
    """PROJECTION of Experiment 1 run as one sweep with every run compiled, on this GPU: each preset's first seed
    compiles with Inductor's caches cold, the others find them warm and pay the warm/cold share of the compile
    time measured on the first preset (`check_compiled`). What `compile: auto` would gain by compiling sweeps."""
    label = f"PROJECTION {preset.name}, a sweep compiling every run"
    timing = context.results.get("throughput_compiled", {}).get("compile_first_steps_s")
    missing = [name for name, _ in experiment.presets if "tokens_per_s" not in speeds["compiled"].get(name, {})]
    if not timing or missing:
        return {"row": (label, f"not projected: no compiled speed for {', '.join(missing) or 'the warm compile'}")}
    eager_first = speeds["eager"].get(timing["preset"], {}).get("first_step_s", 0.0)
    warm_share = max(0.0, timing["warm"] - eager_first) / max(1e-9, timing["cold"] - eager_first)
    runs = []
    for name, overrides in experiment.presets:
        compiled, eager = speeds["compiled"][name], speeds["eager"].get(name, {})
        cold_s = compile_cost_s(compiled, eager)
        tokens, _ = run_length(experiment, overrides)
        one = {"label": name, "tokens": tokens, "tokens_per_s": compiled["tokens_per_s"]}
        runs += [{**one, "seeds": 1, "compile_s": cold_s}]
        runs += [{**one, "seeds": len(experiment.seeds) - 1, "compile_s": cold_s * warm_share}]
    here = project(runs, startup, preset, main_precision(context.device), price)["targets"][0]
    cost = "n/a (no price)" if here["cost_usd"] is None else f"${here['cost_usd']:.2f}"
    basis = f"each preset's first seed compiles cold, the others at {warm_share:.2f} of that (warm caches)"
    return {"row": (label, f"{here['wall_s'] / 60:.1f} min, {cost} ({basis})"), "warm_share": warm_share, **here}
