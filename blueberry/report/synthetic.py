"""Synthetic run records in the exact on-disk format of a real run (tracking/schema.py), for tests and the bench.

Curves decay smoothly from the unigram loss to the requested final values, so plots and tables look
like real ones; the final eval row equals the summary, as in a real run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from blueberry.fileio import finite, write_json_atomic
from blueberry.models import registry
from blueberry.spec import RunSpec
from blueberry.tracking.schema import METRICS_FILE, SPEC_FILE, STATUS_FILE, SUMMARY_FILE, make_header

UNIGRAM = 7.5


def write_run(
    root: str | Path,
    experiment: str,
    *,
    variant: str = registry.DEFAULT_PRESET,
    seed: int = 42,
    lr: float = 0.01,
    steps: int = 100,
    eval_every: int = 25,
    log_every: int = 10,
    val_loss: float = 4.0,
    val_accuracy: float = 0.3,
    val_perplexity: float | None = None,
    minutes: float = 1.0,
    tokens_per_s: float = 5000.0,
    params: tuple[int, int] = (2_000_000, 1_500_000),
    state: str = "finished",
    reason: str | None = None,
    created_at: str = "2025-09-25T12:00:00+0000",
    sweep: dict | None = None,
    tags: tuple[str, ...] = (),
    hardware: dict | None = None,
    spec: dict | None = None,
    run_id: str | None = None,
) -> Path:
    """Write runs/<experiment>/<run_id>/ with spec.json, metrics.jsonl, summary.json, status.json."""
    raw = {
        "experiment": experiment,
        "seed": seed,
        "tags": list(tags),
        "model": {"variant": variant},
        "train": {"steps": steps, "eval_every": eval_every, "log_every": log_every, "lr": lr},
    }
    for section, values in (spec or {}).items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    run_spec = RunSpec.model_validate(raw)
    run_id = run_id or f"{run_spec.run_name}-{run_spec.spec_hash()[:8]}"
    run_dir = Path(root) / experiment / run_id
    run_dir.mkdir(parents=True)
    ppl = val_perplexity if val_perplexity is not None else math.exp(min(val_loss, 20))
    header = make_header(
        name=run_spec.run_name,
        run_id=run_id,
        spec=run_spec,
        params={"total": params[0], "active": params[1], "embedding": params[1] // 2},
        data={
            "fingerprint": "0" * 64,
            "leakage": {"ngram": 13, "val_windows_with_train_ngram": 0.0018, "val_docs_in_train": 0},
            "unigram_loss": UNIGRAM,
        },
        hardware=hardware or {"device": "cpu", "precision": "fp32", "threads": 2},
        created_at=created_at,
        sweep=sweep,
    )
    write_json_atomic(run_dir / SPEC_FILE, header)
    last = steps if state == "finished" else steps // 2
    _write_metrics(run_dir / METRICS_FILE, run_spec, last, val_loss, val_accuracy, ppl, minutes, tokens_per_s)
    if state == "finished":
        summary = {
            "val/loss": val_loss,
            "val/accuracy": val_accuracy,
            "val/perplexity": ppl,
            "val/best_loss": val_loss,
            "perf/tokens_per_s": tokens_per_s,
            "time/train_s": minutes * 60,
            "trainer/step": steps,
            "unigram_loss": UNIGRAM,
            "params/total": params[0],
            "params/active": params[1],
        }
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    write_json_atomic(run_dir / STATUS_FILE, {"state": state, "reason": reason, "started_at": 0, "updated_at": 1})
    return run_dir


def _write_metrics(path: Path, spec: RunSpec, last: int, loss: float, acc: float, ppl: float, minutes, tok_s) -> None:
    """Rows as the trainer logs them; formatted directly (not json.dumps) so the benchmark writes fast."""
    cfg = spec.train
    total = cfg.steps
    rng = np.random.default_rng(spec.seed)
    experts = spec.model.n_experts
    # router loads: balanced and constant, so one string serves every row
    moe = "".join(
        ", ".join(f'"moe/layer{layer}/load_e{e}": {1 / experts:.6f}' for e in range(experts))
        + f', "moe/layer{layer}/load_max": {1 / experts:.6f}, "moe/layer{layer}/balance_loss": 1.0, '
        for layer in (range(spec.model.n_layers) if spec.model.is_moe else ())
    )
    lines = []
    for step in range(1, last + 1):
        frac = step / total
        decay = math.exp(-5 * frac) - math.exp(-5)  # exactly 0 at the last step
        t = minutes * 60 * frac
        if step % cfg.log_every == 0 or step == last:
            train = loss + (UNIGRAM - loss) * decay + 0.05 * rng.standard_normal()
            speed = tok_s * (1 + 0.02 * rng.standard_normal())
            row = (
                f'{{"step": {step}, "time": {t:.3f}, "train/loss": {_number(train)}, "train/aux_loss": 0.01, {moe}'
                f'"train/lr": {cfg.lr:.6g}, "train/grad_norm": {0.5 + decay:.4f}, '
                f'"trainer/tokens": {step * cfg.batch_size * 128}, "perf/tokens_per_s": {speed:.1f}, '
                f'"perf/step_time_s": 0.1, "perf/peak_memory_mb": 512.0, "perf/elapsed_s": {t:.3f}'
            )
            lines.append(row + "}")
        if step % cfg.eval_every == 0 or step == last:
            vl = loss + (UNIGRAM - loss) * decay
            va = acc * (1 - decay)
            vp = ppl if step == total else math.exp(min(vl, 20))
            lines.append(
                json.dumps(
                    finite(
                        {"step": step, "time": t + 0.5, "val/loss": vl, "val/accuracy": va, "val/perplexity": vp}
                        | {"val/tokens": 1000, "trainer/tokens": step * cfg.batch_size * 128}
                    )
                )
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _number(value: float) -> str:
    """A JSON number, or as the run record writes NaN/inf (fileio.finite): a string."""
    return f"{value:.6f}" if math.isfinite(value) else f'"{value}"'
