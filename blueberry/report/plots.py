"""Matplotlib PNGs: curves per configuration (mean over seeds, band = min–max over seeds), LR sweeps
on a log axis, bars of final metrics with sd error bars.

Two phases, so a rebuild redraws only what changed: each public function turns groups into a `Figure`
(the exact arrays and strings it will draw, nothing else), and `render_all` draws the figures. A figure's
key is a hash of that data, so `render_all` copies a PNG drawn by an earlier build with the same key from
the cache directory, and draws the rest on every core.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from blueberry.fileio import atomic_writer, source_digest  # noqa: E402
from blueberry.models import registry  # noqa: E402
from blueberry.report.groups import Group  # noqa: E402

MAX_CURVES = 10  # more lines than this are unreadable: plot the best ones and say so
COLOURS = 10  # matplotlib's tab10 palette
MAX_BARS = 30
CURVES_2X2 = (
    ("train/loss", "train loss"),
    ("val/loss", "val loss"),
    ("val/accuracy", "val accuracy"),
    ("val/perplexity", "val perplexity"),
)
DPI = 100
MARKED_POINTS = 5  # lines of this many points or fewer get markers
# Below this many figures to draw, a process pool costs more to start (~1 s of imports each) than it saves.
MIN_PARALLEL = 8
DRAWING_CODE = source_digest([__file__])  # a change of how figures are drawn redraws every cached PNG


@dataclass(frozen=True)
class Figure:
    """What one PNG shows: `kind` names its drawing function in DRAW, `data` holds lists, numbers and strings."""

    kind: str
    data: dict

    def key(self) -> str:
        """Same data and drawing code, same picture: a digest of everything drawn (floats by their exact repr)."""
        text = json.dumps(
            [self.kind, DPI, matplotlib.__version__, DRAWING_CODE, self.data], sort_keys=True, default=repr
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def band(group: Group, metric: str, x: str = "step"):
    """(x, mean, min, max, n) over the group's finished seeds that logged `metric` (n of them), at the steps
    every one of them logged.

    With x="time" the x value is the mean wall time (minutes) of the seeds at each step.
    """
    curves = [(r.history.series(metric), r.history.series(metric, x="time")[0]) for r in group.ok]
    curves = [c for c in curves if c[0][0].size]
    if not curves:
        return None
    steps = curves[0][0][0]
    for (s, _), _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    if not steps.size:
        return None
    ys, ts = [], []
    for (s, y), t in curves:
        _, idx = np.unique(s, return_index=True)  # first row per step
        pos = np.searchsorted(s[idx], steps)
        ys.append(y[idx][pos])
        ts.append(t[idx][pos] / 60)
    ys = np.array(ys)
    xs = np.mean(ts, axis=0) if x == "time" else steps
    return xs, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0), len(curves)


# ---------------------------------------------------------------- phase 1: groups → figure data


def _shown(groups: list[Group]) -> tuple[list[Group], str]:
    done = [g for g in groups if g.ok]
    if len(done) <= MAX_CURVES:
        return done, ""
    return done[:MAX_CURVES], f" (best {MAX_CURVES} of {len(done)})"


def _slots(groups: list[Group]) -> list[int]:
    """Colour slots: by model category where the groups are models of distinct categories (the study's plots
    colour models so, and a category keeps its colour in every plot), else by rank. Only while the palette has a
    colour for every category: beyond that, two categories in one plot could share one."""
    order = [preset.category for preset in registry.PRESETS.values()]
    model = ({name: g.get(f"model.{name}") for name in ("variant", "attention", "ffn")} for g in groups)
    categories = [registry.category(m) for m in model]
    distinct = len(set(categories)) == len(categories) and len(order) <= COLOURS
    if distinct and all(c in order for c in categories):
        return [order.index(c) for c in categories]
    return list(range(len(groups)))


def _lines(groups: list[Group], metric: str, x: str) -> list[dict]:
    """One line per group (its colour slot kept when a group has no curve, as the legend's order is)."""
    lines = []
    for slot, group in zip(_slots(groups), groups):
        curve = band(group, metric, x)
        if curve is not None:
            *arrays, n = curve  # n: the seeds drawn, which a run that never logged `metric` is not among
            xs, mean, lo, hi = (np.asarray(a, dtype=float).tolist() for a in arrays)
            lines.append(
                {"slot": slot, "label": f"{group.label} (n={n})", "x": xs, "y": mean, "lo": lo, "hi": hi, "band": n > 1}
            )
    return lines


def val_loss_curves(groups: list[Group], title: str, x: str = "step") -> Figure | None:
    """Val loss vs step or vs wall time, one mean line + seed band per configuration (ranked groups)."""
    shown, note = _shown(groups)
    lines = _lines(shown, "val/loss", x)
    if not lines:
        return None
    return Figure(
        "val_loss_curves",
        {
            "lines": lines,
            "xlabel": "optimizer step" if x == "step" else "wall time (min)",
            "title": f"{title}: val loss vs {'step' if x == 'step' else 'wall time'}{note}\n"
            "line: mean; band: min–max over seeds",
        },
    )


def curves_2x2(groups: list[Group], title: str, checkpoints: list[int] = ()) -> Figure | None:
    """Train loss, val loss, val accuracy, val perplexity vs step (the exp3 10k-run figure)."""
    shown, note = _shown(groups)
    if not shown:
        return None
    return Figure(
        "curves_2x2",
        {
            "panels": [
                {"metric": metric, "name": name, "lines": _lines(shown, metric, "step")} for metric, name in CURVES_2X2
            ],
            "checkpoints": [int(s) for s in checkpoints],
            "title": f"{title}: training curves{note} (mean over seeds, band min–max)",
        },
    )


def bars(groups: list[Group], metric: str, title: str, ylabel: str) -> Figure | None:
    """Final `metric` per configuration: mean with sd error bars (none with one seed)."""
    done = [g for g in groups if g.stat(metric).mean is not None][:MAX_BARS]
    if not done:
        return None
    stats = [g.stat(metric) for g in done]
    return Figure(
        "bars",
        {
            "labels": [g.label for g in done],
            "means": [s.mean for s in stats],
            "sds": [s.sd or 0.0 for s in stats],
            "ns": [s.n for s in stats],
            "ylabel": ylabel,
            "title": f"{title}: {ylabel} (error bars: sd over seeds)",
        },
    )


def lr_sweep(groups: list[Group], title: str) -> Figure | None:
    """LR vs final val loss and val accuracy, log-x, sd error bars (the study's semilog figure)."""
    done = [g for g in groups if g.ok and g.get("train.lr")]
    if not done:
        return None
    panels = []
    for metric, name in (("val/loss", "val loss"), ("val/accuracy", "val accuracy")):
        # an LR none of whose runs recorded the metric has no point in this panel
        points = [(g.get("train.lr"), g.stat(metric)) for g in done if g.stat(metric).mean is not None]
        panels.append(
            {
                "name": name,
                "lrs": [lr for lr, _ in points],
                "means": [s.mean for _, s in points],
                "sds": [s.sd or 0.0 for _, s in points],
            }
        )
    return Figure(
        "lr_sweep",
        {
            "panels": panels,
            "best_lr": min(done, key=lambda g: g.loss.mean).get("train.lr"),
            "title": f"{title}: final metrics vs LR (mean ± sd over seeds)",
        },
    )


# ---------------------------------------------------------------- phase 2: figure data → PNG


def _draw_lines(ax, lines: list[dict]) -> None:
    colors = plt.cm.tab10(np.arange(COLOURS))
    for line in lines:
        color = colors[line["slot"] % COLOURS]
        few = len(line["x"]) <= MARKED_POINTS  # a run evaluated once or twice: a line alone would not show
        ax.plot(line["x"], line["y"], color=color, label=line["label"], lw=1.6, marker="o" if few else None)
        if line["band"]:
            ax.fill_between(line["x"], line["lo"], line["hi"], color=color, alpha=0.18, lw=0)


def _draw_val_loss_curves(d: dict):
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    _draw_lines(ax, d["lines"])
    ax.set_xlabel(d["xlabel"])
    ax.set_ylabel("validation loss")
    ax.set_title(d["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _draw_curves_2x2(d: dict):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    for ax, panel in zip(axes.flat, d["panels"]):
        _draw_lines(ax, panel["lines"])
        for step in d["checkpoints"]:
            ax.axvline(step, color="grey", ls=":", lw=0.8)
        ax.set_title(panel["name"])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if panel["metric"] == "val/perplexity":
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks cost more than the plot
    handles, labels = axes.flat[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(d["title"])
    return fig


def _draw_bars(d: dict):
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(d["labels"]) + 2), 4.5), layout="constrained")
    xs = np.arange(len(d["labels"]))
    ax.bar(xs, d["means"], yerr=d["sds"], capsize=4, color=plt.cm.tab10(xs % 10))
    for x, n in zip(xs, d["ns"]):
        ax.annotate(f"n={n}", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(xs, d["labels"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(d["ylabel"])
    ax.set_title(d["title"])
    ax.grid(axis="y", alpha=0.3)
    return fig


def _draw_lr_sweep(d: dict):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, panel in zip(axes, d["panels"]):
        ax.errorbar(panel["lrs"], panel["means"], yerr=panel["sds"], marker="o", capsize=4)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (train.lr)")
        ax.set_ylabel(panel["name"])
        ax.grid(alpha=0.3, which="both")
    axes[0].axvline(d["best_lr"], color="green", ls="--", lw=1, label=f"best {d['best_lr']:g}")
    axes[0].legend(fontsize=8)
    fig.suptitle(d["title"])
    return fig


DRAW = {
    "val_loss_curves": _draw_val_loss_curves,
    "curves_2x2": _draw_curves_2x2,
    "bars": _draw_bars,
    "lr_sweep": _draw_lr_sweep,
}


def draw(figure: Figure, path: Path) -> Path:
    """One PNG, written atomically: a killed build never leaves half a PNG in the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = DRAW[figure.kind](figure.data)
    try:
        with atomic_writer(path, binary=True) as handle:
            fig.savefig(handle, dpi=DPI, format="png")  # no bbox_inches="tight": it lays the figure out twice
    finally:
        plt.close(fig)
    return path


def render_all(jobs: list[tuple[Figure, Path]], cache_dir: Path | None = None) -> dict:
    """Write each figure to its path: copied from `cache_dir` when drawn before, else drawn (in parallel).

    With a cache, PNGs no build used this time are removed from it, so it holds one report's figures.
    Returns {"reused": n, "drawn": n}.
    """
    if cache_dir is None:
        for figure, path in jobs:
            draw(figure, path)
        return {"reused": 0, "drawn": len(jobs)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    keyed = [(cache_dir / f"{figure.key()}.png", figure, path) for figure, path in jobs]
    todo = {png: figure for png, figure, _ in keyed if not png.exists()}
    workers = min(len(todo), os.cpu_count() or 1)
    if workers > 1 and len(todo) >= MIN_PARALLEL:
        # spawn, not fork: the parent may hold threads (Arrow's reader, torch) that a fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(draw, todo.values(), todo.keys()))
    else:
        for png, figure in todo.items():
            draw(figure, png)
    for png, _, path in keyed:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, path)
    used = {png for png, _, _ in keyed}
    for stale in set(cache_dir.glob("*.png")) - used:
        stale.unlink(missing_ok=True)
    return {"reused": len(used) - len(todo), "drawn": len(todo)}
