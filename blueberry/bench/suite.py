"""`make bench`: throughput and MFU per variant at the quickstart and 512d shapes, the speed ratios the
project tracks, and its speed targets checked on this machine. Prints one table; saves JSON (and the table)
under reports/bench/.

Ratios of two configurations are speed-ups (tokens/s of A over B, > 1 means A is faster) except the MoE/dense
and tracking ones, which compare step times as the targets state them.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blueberry.bench.contention import POLICIES, measure_contention
from blueberry.bench.measure import first_step_latency, measure_throughput, optimizer_step_s, tracking_overhead
from blueberry.fileio import write_results
from blueberry.hardware import bf16_emulated, detect, preset_for, resolve_device, resolve_precision
from blueberry.models import registry
from blueberry.overrides import load_spec
from blueberry.perf import measure_gemm_ceiling, peak_flops, save_ceiling
from blueberry.provenance import SOURCE_TREE, code_version, library_versions

EXPERIMENTS = SOURCE_TREE / "experiments"  # the checkout's specs, wherever bench runs (the CLI checks they exist)
QUICKSTART = str(EXPERIMENTS / "quickstart.json")
# The presets with a 512d experiment file (registry.py; every preset is measured at the quickstart shape), and
# the dense one whose MFU is a target.
STUDY_512D = {p.name: str(EXPERIMENTS / p.bench_spec) for p in registry.PRESETS.values() if p.bench_spec}
DENSE_512D = registry.preset_for("mha", "mlp").name
# The bench's tiny stand-in for tests (`--quick`): seconds per case.
TINY = ["--model.d_model=64", "--model.n_layers=1", "--model.n_experts=4", "--model.expert_d_ff=64"]
TINY += ["--model.d_ff=128", "--model.q_lora_rank=16", "--model.kv_lora_rank=16", "--data.vocab_size=512"]
TINY += ["--data.seq_len=32", "--train.batch_size=4", "--train.grad_accum=1"]

# key: (what, comparison, limit, display format)
TARGETS = {
    "mfu_512d_dense": (
        f"512d dense ({DENSE_512D}) FLOP/s ÷ peak (CPU: measured GEMM ceiling; GPU: data sheet), its precision",
        ">=",
        0.40,
        ".1%",
    ),
    "moe_vs_dense_512d": ("MoE step ÷ dense step of equal active params (512d, worst MoE)", "<=", 1.3, ".2f"),
    "tracking_overhead": ("tracking (run record + W&B offline) cost per step", "<=", 0.02, "+.1%"),
    "first_step_warm_s": (
        "first training step after `blueberry run` starts (quickstart, warm cache)",
        "<=",
        10.0,
        ".1f",
    ),
    "contention": (
        "step time with 2 × cores busy processes ÷ idle (quickstart, Blueberry's threads)",
        "<=",
        3.0,
        ".2f",
    ),
    "report_warm_s": ("report rebuild, 1,000 runs × 1,500 steps, nothing changed (s)", "<=", 5.0, ".1f"),
}


@dataclass
class Case:
    key: str  # shape/variant/precision[/option]
    shape: str
    label: str
    spec_path: str
    overrides: list[str] = field(default_factory=list)
    group: str = ""  # cases compared in a ratio share a group and are measured in alternating rounds
    rounds: int = 2


def native_precision() -> str:
    """The precision the 512d cases run in: what `train.precision: auto` picks here (bf16 on GPUs and AMX or
    AVX512-BF16 CPUs; fp32 on AVX2-only CPUs, where bf16 is emulated 20-90x slower and a 512d step takes minutes)."""
    return resolve_precision("auto", resolve_device("auto"))


def _overrides(variant: str, precision: str, *extra: str) -> list[str]:
    return [f"--model.variant={variant}", f"--train.precision={precision}", *extra]


def _dense_equal_d_ff(spec_path: str, variant: str) -> int:
    """SwiGLU width of a dense FFN with the MoE's active parameters: (top_k + shared) routed-expert widths."""
    model = load_spec(spec_path, [f"--model.variant={variant}"]).model
    return (model.top_k + model.n_shared_experts) * model.expert_d_ff


def build_cases(quick: bool, fast: str = "bf16") -> list[Case]:
    """Every configuration the table and the ratios need, grouped by what they are compared with.

    `fast` is the precision the 512d cases run in (`native_precision()`); where it is fp32 the CPU has no
    native bf16, and bf16 is measured only for the quickstart's dense preset, once, for the bf16/fp32 row.
    """
    cases: list[Case] = []
    tiny, rounds = (TINY, 1) if quick else ([], 2)

    def add(key, shape, label, path, overrides, rounds=rounds):
        group = "/".join(key.split("/")[:2])  # shape/variant
        cases.append(Case(key, shape, label, path, [*overrides, *tiny], group, rounds))

    for variant, preset in registry.PRESETS.items():
        add(f"q/{variant}/fp32", "quickstart", variant, QUICKSTART, _overrides(variant, "fp32"))
        if fast == "bf16" or variant == DENSE_512D:
            bf16_rounds = rounds if fast == "bf16" else 1
            add(f"q/{variant}/bf16", "quickstart", variant, QUICKSTART, _overrides(variant, "bf16"), bf16_rounds)
        if not registry.FFNS[preset.ffn].transformers_experts:
            continue
        # the experts implementations and the dense twin at the quickstart's own precision (fp32)
        for implementation in ("eager", "grouped_mm"):
            other = _overrides(variant, "fp32", f"--model.experts_implementation={implementation}")
            add(f"q/{variant}/fp32/{implementation}", "quickstart", f"{variant} {implementation}", QUICKSTART, other)
        dense_twin = registry.dense_twin(preset).name
        d_ff = _dense_equal_d_ff(QUICKSTART, variant)
        dense = _overrides(dense_twin, "fp32", f"--model.d_ff={d_ff}")
        label = f"{dense_twin} d_ff={d_ff} (= {variant} active)"
        add(f"q/{variant}/fp32/dense_equal", "quickstart", label, QUICKSTART, dense)
    if quick:  # torch.compile takes minutes on 2 cores: not for a smoke test
        return cases
    # The quickstart as users run it (fp32), compiled: its first steps compile, and recompile for new shapes.
    variant = load_spec(QUICKSTART, []).model.label
    compiled = _overrides(variant, "fp32", "--train.compile=true")
    add(f"q/{variant}/fp32/compiled", "quickstart", f"{variant} compiled", QUICKSTART, compiled, rounds=1)
    one_step = ["--train.grad_accum=1"]  # one 16 × 256-token micro-batch per optimizer step (the study has 4)
    precision = f"--train.precision={fast}"
    for variant, path in STUDY_512D.items():
        add(f"s/{variant}/{fast}", "512d", variant, path, [precision, *one_step])
        if variant == DENSE_512D:
            if fast == "bf16":
                add(f"s/{variant}/fp32", "512d", variant, path, ["--train.precision=fp32", *one_step])
            compiled = [precision, "--train.compile=true", *one_step]
            add(f"s/{variant}/{fast}/compiled", "512d", f"{variant} compiled", path, compiled, rounds=1)
        if registry.FFNS[registry.PRESETS[variant].ffn].transformers_experts:
            eager = [precision, "--model.experts_implementation=eager", *one_step]
            add(f"s/{variant}/{fast}/eager", "512d", f"{variant} eager", path, eager)
            dense_twin = registry.dense_twin(registry.PRESETS[variant]).name
            d_ff = _dense_equal_d_ff(path, variant)
            dense = [precision, f"--model.d_ff={d_ff}", *one_step]
            label = f"{dense_twin} d_ff={d_ff} (= {variant} active)"
            add(f"s/{variant}/{fast}/dense_equal", "512d", label, STUDY_512D[dense_twin], dense)
    # The report's 49,152-token vocabulary: the LM head's peak memory with the chunked loss and with full logits.
    vocab = [precision, "--data.vocab_size=49152", *one_step]
    add(f"v/{DENSE_512D}/{fast}", "512d, 49K vocab", f"{DENSE_512D} chunked loss", STUDY_512D[DENSE_512D], vocab)
    full = [*vocab, "--train.chunked_loss=false"]
    label = f"{DENSE_512D} full fp32 logits"
    add(f"v/{DENSE_512D}/{fast}/full_logits", "512d, 49K vocab", label, STUDY_512D[DENSE_512D], full)
    return cases


def measure_groups(cases: list[Case], quick: bool, log=print) -> dict[str, dict]:
    """Measure each group's cases in alternating rounds (A B A B), so a ratio compares figures taken together.

    A case's step time is the median of its timed steps pooled over its rounds.
    """
    # (warmup, timed) steps per round: at the quickstart shape, and at 512d where one step takes seconds. Each
    # case starts on a trimmed heap (`reset_peak_rss`), and a 512d MoE takes 3-4 steps to reach the memory it
    # then keeps (its first steps pay page faults: 2.6 and 2.0 s against a settled 1.7 s with one micro-batch,
    # 2-core AVX512-BF16 EPYC), so the 512d steps are timed after 3: the study's 375 steps are settled ones.
    small_steps, large_steps = ((1, 2), (1, 2)) if quick else ((2, 4), (3, 2))
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    rounds_of: dict[str, list[dict]] = {}
    done = 0
    for group in groups.values():
        for round_ in range(max(case.rounds for case in group)):
            for case in group:
                if round_ >= case.rounds or "error" in (rounds_of.get(case.key) or [{}])[-1]:
                    continue
                steps = small_steps if case.shape == "quickstart" else large_steps
                try:
                    measured = measure_throughput(load_spec(case.spec_path, case.overrides), *steps)
                except Exception as exc:  # one failing configuration (e.g. compile) must not sink the bench
                    measured = {"error": f"{type(exc).__name__}: {exc}"}
                rounds_of.setdefault(case.key, []).append(measured)
                done += 1
                log(
                    f"[{done}] {case.key} round {round_ + 1}: "
                    + (measured.get("error") or f"{measured['tokens_per_s']:.0f} tokens/s")
                )
    results = {}
    for case in cases:
        merged = merge_rounds(rounds_of[case.key])
        results[case.key] = {"shape": case.shape, "label": case.label, "overrides": case.overrides, **merged}
    return results


def merge_rounds(rounds: list[dict]) -> dict:
    """One case's figures over its rounds: pooled timed steps, the first round's first step, the highest peak."""
    if any("error" in r for r in rounds):
        return next(r for r in rounds if "error" in r)
    first = rounds[0]
    timed = [t for r in rounds for t in r["timed_step_s"]]
    step_s = statistics.median(timed)
    return {
        **first,
        "rounds": len(rounds),
        "timed_step_s": timed,
        "step_s": step_s,
        "tokens_per_s": first["tokens_per_step"] / step_s,
        "tflops": first["flops_per_token"] * first["tokens_per_step"] / step_s / 1e12,
        "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in rounds) or None,
    }


def measure_ceilings(quick: bool, before: dict[str, float] | None = None) -> dict[str, float]:
    """bf16 and fp32 GEMM ceilings of this CPU (at least `before`); a full run caches them for the runs' MFU."""
    sizes = (256, 512) if quick else (512, 1024, 2048)
    ceilings = {}
    for precision in ("fp32", "bf16"):
        measured = measure_gemm_ceiling(precision, sizes=sizes, repeats=3 if quick else 7)
        ceilings[precision] = max(measured, (before or {}).get(precision, 0.0))
        if not quick:
            save_ceiling(precision, ceilings[precision])
    return ceilings


def mfu_peaks(ceilings: dict[str, float], device: torch.device) -> dict[str, float | None]:
    """The peak FLOP/s of each precision that MFU divides by on the device the cases ran on, as a run takes it
    (`perf.peak_flops`): on a GPU its data-sheet peak (the GEMM ceilings are the CPU's, measured on CPU tensors);
    on CPU the measured GEMM ceiling, None where bf16 is emulated, whose ceiling is no peak. None: no MFU."""
    if device.type == "cuda":
        preset = preset_for(torch.cuda.get_device_name(device))
        return {precision: peak_flops(device, precision, preset)[0] for precision in ceilings}
    return {precision: None if bf16_emulated(device, precision) else flops for precision, flops in ceilings.items()}


def add_mfu(results: dict, peaks: dict[str, float | None]) -> None:
    """Each measured case's FLOP/s ÷ the peak of its precision (`mfu_peaks`); None where that has none."""
    for result in results.values():
        if "error" not in result:
            peak = peaks[result["precision"]]
            result["mfu"] = None if peak is None else result["tflops"] * 1e12 / peak


def ratio(results: dict, a: str, b: str, by: str = "tokens_per_s") -> float | None:
    if a in results and b in results and "error" not in results[a] and "error" not in results[b]:
        return results[a][by] / results[b][by]
    return None


def compute_ratios(results: dict) -> dict[str, float | None]:
    out = {}
    for key in results:
        parts = key.split("/")
        fp32 = f"{parts[0]}/{parts[1]}/fp32"
        if len(parts) == 3 and parts[2] == "bf16" and fp32 in results:  # at 512d only the dense mlp has both
            out[f"bf16/fp32 {parts[0]}/{parts[1]}"] = ratio(results, key, fp32)
        if len(parts) == 4:
            base = "/".join(parts[:3])
            if parts[3] == "eager":  # our sorted dispatch (the default) against transformers' loop
                out[f"sorted/eager experts {base}"] = ratio(results, base, key)
            elif parts[3] == "grouped_mm":
                out[f"grouped_mm/sorted experts {base}"] = ratio(results, key, base)
            elif parts[3] == "compiled":
                out[f"compiled/eager {base}"] = ratio(results, key, base)
            elif parts[3] == "full_logits":
                out[f"peak memory full logits/chunked loss {base}"] = ratio(results, key, base, by="peak_rss_mb")
            elif parts[3] == "dense_equal":
                out[f"MoE/dense step {base}"] = ratio(results, base, key, by="step_s")
    return out


def optimizer_shares(cases: list[Case], results: dict, fast: str, log=print) -> dict[str, float | dict]:
    """The optimizer step's share of a training step (one micro-batch per step, as the bench times it; the
    study's grad_accum 4 divides it by about 4) for each shape's MoE and dense cases at their precision, and
    the MoE/dense step with it taken out of both (`moe_dense_without_optimizer`). A share that could not be
    measured is {"error": why}."""
    from blueberry.train.muon import orthogonaliser_dtype

    shares = {}
    for case in cases:
        parts = case.key.split("/")
        plain_or_twin = len(parts) == 3 or parts[3:] == ["dense_equal"]
        if not plain_or_twin or "error" in results.get(case.key, {"error": 1}):
            continue
        if (parts[0], parts[2]) not in (("q", "fp32"), ("s", fast)):
            continue
        spec = load_spec(case.spec_path, case.overrides)
        seconds = guarded(f"optimizer step {case.key}", log, optimizer_step_s, spec)
        if isinstance(seconds, dict):  # one failing model must not lose the other cases' shares, nor the bench
            shares[f"optimizer step/step {case.key}"] = seconds
            continue
        results[case.key]["optimizer_step_s"] = seconds
        shares[f"optimizer step/step {case.key}"] = seconds / results[case.key]["step_s"]
        dtype = orthogonaliser_dtype(resolve_device(spec.train.device))
        log(f"optimizer step {case.key}: {seconds * 1e3:.0f} ms (Newton-Schulz in {dtype})")
    study_accumulation = load_spec(STUDY_512D[DENSE_512D], []).train.grad_accum
    return {**shares, **moe_dense_without_optimizer(results, study_accumulation)}


def moe_dense_without_optimizer(results: dict, study_accumulation: int) -> dict[str, float]:
    """MoE ÷ dense-twin step with each one's optimizer step taken out: the model's forward and backward alone;
    and at 512d, from the same parts, the step of the study's recipe: `study_accumulation` micro-batches, then
    one optimizer step (the bench times one micro-batch per step: the study's would take minutes per case).

    The twin has the MoE's active parameters, but Muon orthogonalises every expert's matrices, so the MoE's
    optimizer step grows with its total parameters (3x the twin's for 8 experts, top-2 and a shared one)."""
    out = {}
    for key, dense in results.items():
        moe_key = key.removesuffix("/dense_equal")
        moe = results.get(moe_key, {})
        if key.endswith("/dense_equal") and "optimizer_step_s" in moe and "optimizer_step_s" in dense:
            model_s = moe["step_s"] - moe["optimizer_step_s"], dense["step_s"] - dense["optimizer_step_s"]
            out[f"MoE/dense step less the optimizer step {moe_key}"] = model_s[0] / model_s[1]
            if key.startswith("s/"):
                study_s = [study_accumulation * s + r["optimizer_step_s"] for s, r in zip(model_s, (moe, dense))]
                out[f"MoE/dense step at the study's {study_accumulation} micro-batches {moe_key}"] = (
                    study_s[0] / study_s[1]
                )
    return out


def report_build_time(quick: bool) -> dict:
    try:
        from blueberry.report.bench import build_time
    except ImportError:
        return {"error": "report not available (blueberry.report.bench.build_time missing)"}
    try:
        return build_time(n_runs=20, n_steps=100) if quick else build_time(n_runs=1000, n_steps=1500)
    except Exception as exc:  # a broken report must not hide the throughput figures
        return {"error": f"{type(exc).__name__}: {exc}"}


def check_targets(
    results: dict,
    ratios: dict,
    peaks: dict,
    tracking: dict,
    latency: dict,
    report: dict | None = None,
    contention: dict | None = None,
    fast: str = "bf16",
) -> dict:
    dense = results.get(f"s/{DENSE_512D}/{fast}", {"error": "not measured"})
    values = {
        "mfu_512d_dense": None if "error" in dense or peaks[fast] is None else dense["tflops"] * 1e12 / peaks[fast],
        "moe_vs_dense_512d": max(
            (v for k, v in ratios.items() if k.startswith("MoE/dense step s/") and v is not None), default=None
        ),
        "tracking_overhead": tracking.get("overhead"),
        "first_step_warm_s": latency.get("warm", {}).get("first_step_s"),
        "contention": ((contention or {}).get("blueberry") or {}).get("ratio"),
        "report_warm_s": (report or {}).get("warm_s") if (report or {}).get("n_runs") == 1000 else None,
    }
    out = {}
    for key, (what, op, limit, fmt) in TARGETS.items():
        value = values[key]
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out[key] = {"what": what, "target": f"{op} {format(limit, fmt)}", "value": value, "met": met}
    return out


def guarded(stage: str, log, measure, *args, **kwargs) -> dict:
    """`measure(*args, **kwargs)`, or {"error": why} (logged) if it raises: the stages after the cases must not
    lose the cases' figures, which are saved only at the end."""
    try:
        return measure(*args, **kwargs)
    except Exception as exc:
        log(f"{stage} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_after_cases(cases: list[Case], results: dict, quick: bool, fast: str, log=print) -> tuple:
    """The stages after the cases, each {"error": why} where it failed: tracking overhead, first-step latency
    (by cache), step time under load, the optimizer step's shares (with the MoE/dense step without it) and the
    report's build time."""
    tracking_spec = load_spec(QUICKSTART, TINY if quick else [])
    steps, repeats = (10, 1) if quick else (20, 5)
    tracking = guarded("tracking overhead", log, tracking_overhead, tracking_spec, steps=steps, repeats=repeats)
    if "error" not in tracking:
        log(f"tracking overhead {tracking['overhead']:+.1%}")
    latency = {}
    if not quick:
        # fills the tokenizer cache and the OS file cache; where even this run fails, so would the timed ones
        filled = guarded("first step (filling the caches)", log, first_step_latency, QUICKSTART, cold=False)
        for name, cold in (("warm", False), ("cold", True)):
            if "error" in filled:
                latency[name] = filled
                continue
            latency[name] = guarded(f"first step ({name} cache)", log, first_step_latency, QUICKSTART, cold=cold)
            if "error" not in latency[name]:
                log(f"first step ({name} cache): {latency[name]['first_step_s']:.1f} s")
    load_steps = 1 if quick else 5
    contention = guarded("step time under load", log, measure_contention, QUICKSTART, TINY if quick else [], load_steps)
    for policy in POLICIES:
        if "ratio" in contention.get(policy, {}):
            c = contention[policy]
            floor = f" (a fair scheduler's floor {c['floor']:.2f})" if "floor" in c else ""
            log(
                f"contention ({policy}): loaded/idle step {c['ratio']:.2f}{floor}, "
                f"load arriving later {c['later_ratio']:.2f}"
            )
    shares = optimizer_shares(cases, results, fast, log)
    return tracking, latency, contention, shares, report_build_time(quick)


def run_bench(quick: bool = False, out_dir: str | Path = "reports/bench", log=print) -> dict:
    started, load_before = time.time(), os.getloadavg()
    hardware, fast = detect(ask_cuda=True), native_precision()  # on a GPU the bench uses CUDA anyway
    log(f"bench on {hardware.cpu.model}, {hardware.cpu.cores} cores, torch threads {torch.get_num_threads()}")
    log(f"512d cases in {fast} (what train.precision 'auto' picks here)")
    ceilings = measure_ceilings(quick)
    log(f"GEMM ceiling: fp32 {ceilings['fp32'] / 1e12:.3f} TFLOP/s, bf16 {ceilings['bf16'] / 1e12:.3f} TFLOP/s")
    cases = build_cases(quick, fast)
    results = measure_groups(cases, quick, log)
    # Once more at the end, keeping the higher: a ceiling measured while the machine was busy is too low.
    ceilings = measure_ceilings(quick, before=ceilings)
    log(f"GEMM ceiling (best of start and end): fp32 {ceilings['fp32'] / 1e12:.3f}, bf16 {ceilings['bf16'] / 1e12:.3f}")
    peaks = mfu_peaks(ceilings, resolve_device("auto"))
    add_mfu(results, peaks)
    tracking, latency, contention, shares, report = measure_after_cases(cases, results, quick, fast, log)
    ratios = {**compute_ratios(results), **shares}
    outcome = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "hardware": hardware.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "code": code_version(),
        "libraries": library_versions(),
        "gemm_ceiling_flops": ceilings,
        "mfu_peak_flops": peaks,
        "cases": results,
        "ratios": ratios,
        "tracking": tracking,
        "first_step_latency": latency,
        "report_build": report,
        "contention": contention,
        "native_precision": fast,
        "targets": check_targets(results, ratios, peaks, tracking, latency, report, contention, fast),
        "bench_s": time.time() - started,
        # Other processes on the machine skew every figure: the 1-minute load average before and after.
        "load_average": [load_before[0], os.getloadavg()[0]],
    }
    stem = "quick" if quick else time.strftime("%Y%m%d-%H%M%S")
    outcome["saved"] = str(write_results(out_dir, stem, outcome, format_table(outcome)))
    return outcome


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def _failed(entry: dict) -> str:
    """A stage's {"error": why} as a table cell: one line, short."""
    return f"failed: {' '.join(entry['error'].split())[:200]}"


def format_table(outcome: dict) -> str:
    """The one table: per configuration, then ratios and targets as rows of the same table."""
    ceil = outcome["gemm_ceiling_flops"]
    lines = [
        f"GEMM ceiling (measured): fp32 {ceil['fp32'] / 1e12:.3f} TFLOP/s, bf16 {ceil['bf16'] / 1e12:.3f} TFLOP/s; "
        f"{outcome['hardware']['cpu']['model']}, {outcome['torch_threads']} threads; "
        f"load average {outcome['load_average'][0]:.1f} before, {outcome['load_average'][1]:.1f} after "
        f"({outcome['hardware']['cpu']['cores']} cores: a load above that means the figures are contended)",
    ]
    peaks = outcome.get("mfu_peak_flops")  # absent from files of benches before it
    if peaks and outcome["hardware"].get("cuda_available"):  # the cases ran on the GPU, not against the CPU's ceiling
        peak_text = ", ".join(
            f"{p} {_fmt(None if f is None else f / 1e12, '.1f', 'unknown')}" for p, f in peaks.items()
        )
        lines.append(f"MFU against the GPU's data-sheet peak (TFLOP/s): {peak_text}")
    lines += [
        "",
        "| shape | configuration | precision | tokens/s | step (s) | MFU | TFLOP/s | peak RSS (MB) | first step (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in outcome["cases"].values():
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['label']} | | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['label']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
            f"{_fmt(r['mfu'], '.1%', 'n/a')} | {r['tflops']:.3f} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{r['first_step_s']:.2f} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    for name, value in outcome["ratios"].items():
        lines.append(f"| {name} | {_failed(value) if isinstance(value, dict) else _fmt(value, '.2f')} |")
    tracking = outcome["tracking"]
    if "error" in tracking:
        lines.append(f"| tracking on/off step time − 1 | {_failed(tracking)} |")
    else:
        lines.append(
            f"| tracking on/off step time − 1 ({tracking['steps']} steps, log every {tracking['log_every']}) | "
            f"{tracking['overhead']:+.1%} (log calls {tracking['log_share']:.1%}; "
            f"W&B init {tracking['wandb_init_s']:.1f} s once) |"
        )
    for name, lat in outcome["first_step_latency"].items():
        shown = _failed(lat) if "error" in lat else f"{lat['first_step_s']:.1f} s"
        lines.append(f"| first step after `blueberry run` ({name} cache) | {shown} |")
    contention = outcome.get("contention", {})
    if "error" in contention:
        lines.append(f"| step time under a background load ÷ idle | {_failed(contention)} |")
    for policy in POLICIES:
        c = contention.get(policy)
        if c is None:
            continue
        what = f"step time at load {contention['load_processes']} on {contention['cores']} cores ÷ idle, {policy}"
        if "error" in c:
            lines.append(f"| {what} | failed: {c['error']} |")
        else:
            floor = f"; a fair scheduler's floor {c['floor']:.2f}" if "floor" in c else ""
            lines.append(
                f"| {what} | {c['ratio']:.2f} ({c['idle_s']:.3f} s → {c['loaded_s']:.3f} s; "
                f"threads {c['threads_idle']} idle, {c['threads_loaded']} loaded{floor}) |"
            )
            if "later_ratio" in c:  # bench files written before the load-arriving-later measurement lack it
                lines.append(
                    f"| {what.replace(' ÷ idle', ', load arriving after the start, ÷ idle')} | "
                    f"{c['later_ratio']:.2f} ({c['later_s']:.3f} s; threads {c['threads_later']}) |"
                )
    report = outcome["report_build"]
    if "error" in report:
        lines.append(f"| report build | {report['error']} |")
    else:
        lines.append(
            f"| report build, {report['n_runs']} synthetic runs × {report['n_steps']} steps | "
            f"cold {report['cold_s']:.1f} s, warm (cached) {report['warm_s']:.1f} s, "
            f"one run added {report['one_new_run_s']:.1f} s |"
        )
    lines += ["", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for key, t in outcome["targets"].items():
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        lines.append(f"| {t['what']} | {t['target']} | {_fmt(t['value'], TARGETS[key][3])} | {met} |")
    return "\n".join(lines)
