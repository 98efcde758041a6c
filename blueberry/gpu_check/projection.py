"""Experiment 1 as a list of runs, and the projection of its wall time and cost from measured speeds.

Experiment 1 is read from its sweep file (`sweeps/ablation.yaml`), as `blueberry sweep` would run it: the grid of
its `parameters:` (the presets) times its seeds. The projection is arithmetic, labelled as such wherever it is shown:
training tokens ÷ measured tokens/s + a measured fixed start-up per run, on this GPU. On another GPU a step is
taken as host overhead (launching kernels: the host's, so it stays) plus compute, and only the compute scales, by
the ratio of the data-sheet peaks. The compute's share of a step comes from one preset measured at two
micro-batch sizes (`compute_flops_per_s`); without that second size, the whole step scales (equal MFU assumed).
At the study's micro-batch of 16 a big GPU mostly waits on the host (MFU 1-3 % on an H200), so equal MFU would
make a slower GPU look several times slower than it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from blueberry.hardware import PRESETS, Preset
from blueberry.overrides import expand_dotted, leaf_paths, load_spec, read_json_object, value_at
from blueberry.provenance import SOURCE_TREE
from blueberry.sweep import load_sweep, plan
from blueberry.sweep.validate import planned_launches, run_arguments

REPO = SOURCE_TREE  # the checkout: its sweeps/ and experiments/ (the CLI checks they exist)
EXPERIMENT_1 = REPO / "sweeps" / "ablation.yaml"
REPORT_4090_PRICE = 0.18  # $/h: the RTX 4090 price the Blueberry LLM report costed its runs at


@dataclass(frozen=True)
class Experiment:
    base_spec: str  # the spec every run starts from
    presets: list[tuple[str, list[str]]]  # (label, its first seed's run overrides) per grid point other than the seed
    seeds: list  # the seeds each preset runs


def read_experiment(sweep_path: str | Path = EXPERIMENT_1) -> Experiment:
    """The sweep's runs as `blueberry sweep` launches them (W&B's engine plans the grid; each trial's command line is
    built as the agent builds it), grouped by all their parameters but the seed. A preset's overrides are its first
    run's command-line overrides, each parameters file the command names given as one JSON object (`${args_json}`'s
    form)."""
    sweep = load_sweep(sweep_path)
    runs = []
    for _, params, launch, _ in planned_launches(sweep, plan(sweep, None), "projection", "projection-{index}"):
        spec_path, overrides, files = run_arguments(launch.argv)
        layers = [json.dumps(read_json_object(file, "overrides")) for file in files]  # read before the scratch goes
        runs.append((spec_path, expand_dotted(params, "the sweep's parameters"), [*layers, *overrides]))
    varying = [path for path in leaf_paths(runs[0][1]) if path != "seed" and len({_text(r[1], path) for r in runs}) > 1]
    presets: dict[str, list[str]] = {}
    seeds: dict[str, list] = {}
    for _, params, overrides in runs:
        label = " ".join(_text(params, path) for path in varying) or str(sweep.name)
        presets.setdefault(label, overrides)
        seeds.setdefault(label, []).append(params.get("seed"))
    base = Path(runs[0][0])  # relative to the checkout, from whose root the sweep files run
    base = base if base.is_absolute() else REPO / base
    return Experiment(str(base), list(presets.items()), next(iter(seeds.values())))


def _text(params: dict, path: str) -> str:
    """A parameter's value by its dotted path, as text (values may be numbers, lists or dicts)."""
    value = value_at(params, path)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def run_length(experiment: Experiment, overrides: list[str]) -> tuple[int, int]:
    """(tokens, micro-steps) of one run of the preset: optimizer steps × accumulation × micro-batch × sequence
    length, and optimizer steps × accumulation (with batch_size 'auto', whose accumulation the GPU decides: at
    least the optimizer steps)."""
    spec = load_spec(experiment.base_spec, overrides)
    t = spec.train
    if t.batch_size == "auto":
        return t.steps * t.effective_batch * spec.data.seq_len, t.steps
    return t.steps * t.grad_accum * t.batch_size * spec.data.seq_len, t.steps * t.grad_accum


def compute_flops_per_s(small: dict, large: dict, large_micro_steps: int) -> float | None:
    """The GPU's compute speed, in FLOP/s, from one configuration measured (`measure`'s figures) at one micro-step
    of a small micro-batch and at `large_micro_steps` micro-steps of a larger one, taking each micro-step as a fixed
    host overhead plus its FLOPs at that speed. None where the two cannot tell them apart (no larger micro-batch,
    or the larger step no slower per token)."""
    flops = [m["tokens_per_step"] * m["flops_per_token"] for m in (small, large)]
    extra_flops = flops[1] - large_micro_steps * flops[0]
    extra_s = large["step_s"] - large_micro_steps * small["step_s"]
    if extra_flops <= 0 or extra_s <= 0:
        return None
    return extra_flops / extra_s


def project(runs: list[dict], startup_s: float, here: Preset, here_precision: str, price_here: float | None) -> dict:
    """Wall time and cost of `runs` (each {"label", "tokens", "tokens_per_s", "seeds", "compile_s",
    "compute_share"}) here and on a T4 / RTX 4090.

    Here: Σ seeds × (tokens ÷ tokens/s + compile_s + startup_s). Elsewhere: each run's training seconds with their
    compute share (1 if not given: equal MFU) × peak here ÷ peak there (the T4 at its fp16 peak: it has no bf16),
    the rest, the start-up and the compile time unchanged (host work). Cost = hours × $/h of one device.
    """
    train_s = sum(run["seeds"] * run["tokens"] / run["tokens_per_s"] for run in runs)
    startup_total = sum(run["seeds"] * (startup_s + run.get("compile_s", 0.0)) for run in runs)
    shares = [run.get("compute_share", 1.0) for run in runs]
    here_peak = here.peak(here_precision)
    targets = [(here.name, here_precision, 1.0, price_here, "this GPU, measured speed")]
    for name, price, price_source in (("T4", None, None), ("RTX 4090", REPORT_4090_PRICE, "the report's")):
        preset = next(p for p in PRESETS if p.name == name)
        if here_peak is None:
            continue
        target_peak = preset.peak_tflops[preset.precision]
        scaled = f"data-sheet peak {here_peak:g} → {target_peak:g} TFLOP/s ({preset.precision})"
        if min(shares) < 1.0:
            label = (
                f"compute ({min(shares):.0%}–{max(shares):.0%} of a step here) scaled by {scaled}, host overhead kept"
            )
        else:
            label = f"scaled by {scaled}"
        price = price if price is not None else preset.usd_per_hour
        targets.append(
            (name, preset.precision, here_peak / target_peak, price, f"{label}; {price_source or 'list'} $/h")
        )
    rows = []
    for name, precision, factor, price, basis in targets:
        seconds = startup_total + sum(
            run["seeds"] * run["tokens"] / run["tokens_per_s"] * (1 - share + share * factor)
            for run, share in zip(runs, shares)
        )
        rows.append(
            {
                "gpu": name,
                "precision": precision,
                "wall_s": seconds,
                "usd_per_hour": price,
                "cost_usd": None if price is None else seconds / 3600 * price,
                "basis": basis,
            }
        )
    return {"runs": sum(run["seeds"] for run in runs), "train_s_here": train_s, "startup_s": startup_s, "targets": rows}
