"""Experiment 1 as a list of runs, and the projection of its wall time and cost from measured speeds.

Experiment 1 is read from its sweep file (`sweeps/ablation.yaml`): the grid of its `parameters:` (the presets)
times its seeds, each run of its base spec. The projection is arithmetic, labelled as such wherever it is shown:
training tokens ÷ measured tokens/s + a measured fixed start-up per run, on this GPU. On another GPU a step is
taken as host overhead (launching kernels: the host's, so it stays) plus compute, and only the compute scales, by
the ratio of the data-sheet peaks. The compute's share of a step comes from one preset measured at two
micro-batch sizes (`compute_flops_per_s`); without that second size, the whole step scales (equal MFU assumed).
At the study's micro-batch of 16 a big GPU mostly waits on the host (MFU 1-3 % on an H200), so equal MFU would
make a slower GPU look several times slower than it is.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from blueberry.hardware import PRESETS, Preset
from blueberry.overrides import load_spec
from blueberry.provenance import SOURCE_TREE

REPO = SOURCE_TREE  # the checkout: its sweeps/ and experiments/ (the CLI checks they exist)
EXPERIMENT_1 = REPO / "sweeps" / "ablation.yaml"
REPORT_4090_PRICE = 0.18  # $/h: the Blueberry report's RTX 4090 price (reference-facts §11)


@dataclass(frozen=True)
class Experiment:
    base_spec: str  # the spec every run starts from
    presets: list[tuple[str, list[str]]]  # (label, overrides) per grid point other than the seed
    seeds: list[int]
    fixed: list[str]  # overrides every run gets (the sweep's `value:` parameters)


def _flatten(parameters: dict, prefix: str = "") -> dict[str, dict]:
    """Dotted path -> its W&B parameter spec (`value:` or `values:`), through nested `parameters:`."""
    out = {}
    for key, spec in parameters.items():
        if isinstance(spec, dict) and "parameters" in spec:
            out.update(_flatten(spec["parameters"], f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = spec
    return out


def _override(path: str, value) -> str:
    return f"--{path}={value if isinstance(value, str) else json.dumps(value)}"


def read_experiment(sweep_path: str | Path = EXPERIMENT_1) -> Experiment:
    """The sweep's grid as presets × seeds; its base spec is the `.json` of its command line."""
    sweep = yaml.safe_load(Path(sweep_path).read_text())
    base = next(arg for arg in sweep["command"] if str(arg).endswith(".json"))
    params = _flatten(sweep["parameters"])
    seeds = params.pop("seed", {}).get("values", [None])
    fixed = [_override(path, spec["value"]) for path, spec in params.items() if "value" in spec]
    grid = {path: spec["values"] for path, spec in params.items() if "values" in spec}
    presets = []
    for combo in itertools.product(*grid.values()):
        label = " ".join(str(value) for value in combo)
        presets.append((label, [_override(path, value) for path, value in zip(grid, combo)]))
    return Experiment(str(REPO / base), presets, seeds, fixed)


def run_length(experiment: Experiment, overrides: list[str]) -> tuple[int, int]:
    """(tokens, micro-steps) of one run of the preset: optimizer steps × accumulation × micro-batch × sequence
    length, and optimizer steps × accumulation (with batch_size 'auto', whose accumulation the GPU decides: at
    least the optimizer steps)."""
    spec = load_spec(experiment.base_spec, [*experiment.fixed, *overrides])
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
