"""Report build time at scale (called by `make bench`): synthesise runs, build the report cold, then warm.

Cold = every metrics.jsonl parsed and every plot drawn (first build); warm = nothing changed, so the per-run
cache and the plot cache are reused; one new run = what a finished sweep trial costs: that run parsed and its
experiment's plots redrawn.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from blueberry.models import registry
from blueberry.report.build import run_report
from blueberry.report.synthetic import write_run

VARIANTS = tuple(registry.PRESETS)
# the presets of the study's two LR sweeps (sweeps/lr_attention_mlp.yaml, sweeps/lr_attention_moe.yaml)
LR_STUDY_VARIANTS = (registry.preset_for("mla", "mlp").name, registry.preset_for("mla", "glm4_moe").name)
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def synthesise(root: Path, n_runs: int, n_steps: int) -> None:
    """n_runs runs spread over the study's experiments, each logging n_steps train rows (3 layers × 8 experts
    of router metrics on the MoE variants, as the study's presets log) plus an eval every n_steps/15."""
    shape = {"model": {"n_layers": 3, "n_experts": 8}, "train": {"log_every": 1}}
    eval_every = max(1, n_steps // 15)
    for i in range(n_runs):
        kind = i % 4
        seed = i // 4
        common = dict(steps=n_steps, eval_every=eval_every, seed=seed, minutes=2.0 + (i % 7) / 10)
        if kind == 0:
            variant = VARIANTS[seed % len(VARIANTS)]
            loss = 4.0 + VARIANTS.index(variant) / 10 + (seed % 3) / 100
            write_run(root, "exp1-ablation", variant=variant, val_loss=loss, spec=shape, **common)
        elif kind in (1, 2):
            lr = LRS[seed % len(LRS)]
            exp = "exp2-lr-attention-mlp" if kind == 1 else "exp3-lr-attention-moe"
            variant = LR_STUDY_VARIANTS[kind - 1]
            loss = 4.0 + abs(LRS.index(lr) - 3) / 5 + (seed % 3) / 100
            write_run(root, exp, variant=variant, lr=lr, val_loss=loss, spec=shape, **common)
        else:
            experts = 8 if seed % 2 else 16
            write_run(
                root,
                "t4-experts",
                val_loss=4.2 - experts / 100 + (seed % 3) / 100,
                spec={"model": {"n_layers": 3, "n_experts": experts}, "train": {"log_every": 1}},
                **common,
            )


def build_time(n_runs: int = 1000, n_steps: int = 1500) -> dict:
    """Seconds to build the report from n_runs runs of n_steps logged steps: cold (no cache) and warm."""
    with tempfile.TemporaryDirectory(prefix="blueberry-report-bench-") as tmp:
        root, out = Path(tmp) / "runs", Path(tmp) / "reports"
        started = time.perf_counter()
        synthesise(root, n_runs, n_steps)
        synth_s = time.perf_counter() - started
        size_mb = sum(p.stat().st_size for p in root.rglob("metrics.jsonl")) / 1e6
        timings = {}
        for phase in ("cold", "warm", "one_new_run"):
            if phase == "one_new_run":
                write_run(root, "exp1-ablation", variant=VARIANTS[0], seed=n_runs, val_loss=3.9, steps=n_steps)
            started, cpu = time.perf_counter(), time.process_time()
            run_report(runs_root=root, out=out, log=lambda msg: None)
            # CPU seconds too: on a shared machine wall time measures the neighbours as well.
            timings[phase] = (time.perf_counter() - started, time.process_time() - cpu)
        cache_mb = sum(p.stat().st_size for p in (out / "cache").rglob("*.npz")) / 1e6
    return {
        "n_runs": n_runs,
        "n_steps": n_steps,
        "metrics_mb": round(size_mb, 1),
        "cache_mb": round(cache_mb, 1),
        "synthesise_s": round(synth_s, 2),
        "cold_s": round(timings["cold"][0], 2),
        "cold_cpu_s": round(timings["cold"][1], 2),
        "warm_s": round(timings["warm"][0], 2),
        "warm_cpu_s": round(timings["warm"][1], 2),
        "one_new_run_s": round(timings["one_new_run"][0], 2),
        "one_new_run_cpu_s": round(timings["one_new_run"][1], 2),
    }


if __name__ == "__main__":
    result = build_time()
    print(
        f"report build, {result['n_runs']} runs x {result['n_steps']} steps ({result['metrics_mb']} MB of metrics): "
        f"cold {result['cold_s']} s ({result['cold_cpu_s']} s CPU), "
        f"warm (cache, {result['cache_mb']} MB) {result['warm_s']} s ({result['warm_cpu_s']} s CPU), "
        f"one new run {result['one_new_run_s']} s ({result['one_new_run_cpu_s']} s CPU)"
    )
