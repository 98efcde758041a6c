"""reports/dashboard.html: one self-contained page (inline CSS/JS, data embedded as JSON, no network)
with a sortable, filterable run table and overlaid curves for chosen runs and metrics."""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np

from blueberry.report.records import Run

TRAIN_METRICS = ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s")
VAL_METRICS = ("val/loss", "val/accuracy", "val/perplexity")
MAX_POINTS = 200  # per curve: keeps a 1,000-run page at a few MB; the run records keep every row


def _num(value, digits: int = 6):
    """Round for the page (6 significant digits, more than it shows of a loss or an accuracy); NaN/inf → null."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _part(run: Run, metrics: tuple[str, ...]) -> dict | None:
    """Rows logging metrics[0] (train rows or eval rows), thinned to MAX_POINTS (the last row always kept)."""
    cols = run.history.columns
    if metrics[0] not in cols:
        return None
    values = run.history.values
    rows = values[~np.isnan(values[:, cols.index(metrics[0])])]
    if len(rows) > MAX_POINTS:
        keep = np.unique(np.append(np.linspace(0, len(rows) - 1, MAX_POINTS).astype(int), len(rows) - 1))
        rows = rows[keep]
    shown = [k for k in metrics if k in cols]
    rounded = _significant(rows[:, [1] + [cols.index(k) for k in shown]], 6)  # time, then the metrics
    m = {k: _plain(rounded[:, j]) for j, k in enumerate(shown, start=1)}
    return {"step": _plain(_significant(rows[:, 0], 9)), "time": _plain(rounded[:, 0]), "m": m}


def _significant(values: np.ndarray, digits: int) -> np.ndarray:
    """Each value to `digits` significant digits, a whole array at once (~1M values on a 1,000-run page; a
    format() per value took seconds): the double nearest the rounded decimal, as float(f"{v:.6g}") gives, save
    a tie in the next digit, which may round either way."""
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(values)))
    decimals = np.clip(np.where(np.isfinite(exponent), digits - 1 - exponent, 0), -300, 300)
    scale = 10.0 ** np.abs(decimals)  # scaled by a power of ten, rounded to an integer, scaled back exactly
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(decimals >= 0, np.rint(values * scale) / scale, np.rint(values / scale) * scale)


def _plain(column: np.ndarray) -> list:
    """Plain floats (not numpy scalars) for json; NaN/inf → null."""
    values = column.tolist()
    return values if np.isfinite(column).all() else [v if math.isfinite(v) else None for v in values]


def dashboard_data(runs: list[Run], title: str) -> dict:
    rows, curves = [], []
    for run in runs:
        params = run.param_count("total")
        active = run.param_count("active")
        minutes = run.metric("time/train_s")
        rows.append(
            {
                "id": run.id,
                "name": run.name,
                "experiment": run.experiment,
                "variant": run.variant,
                "lr": run.lr,
                "seed": run.seed,
                "state": run.state,
                "val_loss": _num(run.metric("val/loss")),
                "val_acc": _num(run.metric("val/accuracy")),
                "val_ppl": _num(run.metric("val/perplexity")),
                # the page shows these with fixed decimals (123.46 M, 513234 tokens/s): kept to 9 digits
                "params_m": _num(params / 1e6, 9) if params else None,
                "active_m": _num(active / 1e6, 9) if active else None,
                "minutes": _num(minutes / 60, 9) if minutes else None,
                "tokens_per_s": _num(run.metric("perf/tokens_per_s"), 9),
            }
        )
        train, val = _part(run, TRAIN_METRICS), _part(run, VAL_METRICS)
        curves.append({"t": train, "v": val} if train or val else None)
    return {
        "title": title,
        "runs": rows,
        "curves": curves,
        "metrics": [*VAL_METRICS, *TRAIN_METRICS],
        "experiments": sorted({r.experiment for r in runs}),
        "states": sorted({r.state for r in runs}),
    }


def render(runs: list[Run], title: str) -> str:
    template = resources.files("blueberry.report").joinpath("dashboard.html").read_text(encoding="utf-8")
    payload = json.dumps(dashboard_data(runs, title), separators=(",", ":"), allow_nan=False)
    # Inside <script>, "</script>" or "<!--" in a run name would end the element early; "<" only
    # occurs inside JSON strings, where \u003c is the same character.
    return template.replace("/*DATA*/", payload.replace("<", "\\u003c"))
