"""Matplotlib PNGs: curves per configuration (mean over seeds, band = min–max over seeds), LR sweeps
on a log axis, bars of final metrics with sd error bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from blueberry.report.groups import Group  # noqa: E402

MAX_CURVES = 10  # more lines than this are unreadable: plot the best ones and say so
MAX_BARS = 30
CURVES_2X2 = (
    ("train/loss", "train loss"),
    ("val/loss", "val loss"),
    ("val/accuracy", "val accuracy"),
    ("val/perplexity", "val perplexity"),
)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100, format="png")  # no bbox_inches="tight": it lays the figure out twice
    finally:
        plt.close(fig)
    return path


def band(group: Group, metric: str, x: str = "step"):
    """(x, mean, min, max) over the group's finished seeds, at the steps every seed logged.

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
    return xs, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _shown(groups: list[Group]) -> tuple[list[Group], str]:
    done = [g for g in groups if g.ok]
    if len(done) <= MAX_CURVES:
        return done, ""
    return done[:MAX_CURVES], f" (best {MAX_CURVES} of {len(done)})"


def _line(ax, group: Group, metric: str, x: str, color) -> bool:
    curve = band(group, metric, x)
    if curve is None:
        return False
    xs, mean, lo, hi = curve
    ax.plot(xs, mean, color=color, label=f"{group.label} (n={group.loss.n})", lw=1.6)
    if group.loss.n > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
    return True


def val_loss_curves(groups: list[Group], path: Path, title: str, x: str = "step") -> Path | None:
    """Val loss vs step or vs wall time, one mean line + seed band per configuration (ranked groups)."""
    shown, note = _shown(groups)
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    colors = plt.cm.tab10(np.arange(len(shown)) % 10)
    drawn = [_line(ax, g, "val/loss", x, c) for g, c in zip(shown, colors)]
    if not any(drawn):
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step" if x == "step" else "wall time (min)")
    ax.set_ylabel("validation loss")
    ax.set_title(
        f"{title}: val loss vs {'step' if x == 'step' else 'wall time'}{note}\nline: mean; band: min–max over seeds"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def curves_2x2(groups: list[Group], path: Path, title: str, checkpoints: list[int] = ()) -> Path | None:
    """Train loss, val loss, val accuracy, val perplexity vs step (the exp3 10k-run figure)."""
    shown, note = _shown(groups)
    if not shown:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    colors = plt.cm.tab10(np.arange(len(shown)) % 10)
    for ax, (metric, name) in zip(axes.flat, CURVES_2X2):
        for g, c in zip(shown, colors):
            _line(ax, g, metric, "step", c)
        for step in checkpoints:
            ax.axvline(step, color="grey", ls=":", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if metric == "val/perplexity":
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks cost more than the plot
    handles, labels = axes.flat[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(f"{title}: training curves{note} (mean over seeds, band min–max)")
    return save(fig, path)


def bars(groups: list[Group], metric: str, path: Path, title: str, ylabel: str) -> Path | None:
    """Final `metric` per configuration: mean with sd error bars (none with one seed)."""
    done = [g for g in groups if g.stat(metric).mean is not None][:MAX_BARS]
    if not done:
        return None
    stats = [g.stat(metric) for g in done]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(done) + 2), 4.5), layout="constrained")
    xs = np.arange(len(done))
    errors = [s.sd or 0.0 for s in stats]
    ax.bar(xs, [s.mean for s in stats], yerr=errors, capsize=4, color=plt.cm.tab10(xs % 10))
    for x, s in zip(xs, stats):
        ax.annotate(f"n={s.n}", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(xs, [g.label for g in done], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}: {ylabel} (error bars: sd over seeds)")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def lr_sweep(groups: list[Group], path: Path, title: str) -> Path | None:
    """LR vs final val loss and val accuracy, log-x, sd error bars (the study's semilog figure)."""
    done = [g for g in groups if g.ok and g.get("train.lr")]
    if not done:
        return None
    lrs = [g.get("train.lr") for g in done]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, metric, name in zip(axes, ("val/loss", "val/accuracy"), ("val loss", "val accuracy")):
        stats = [g.stat(metric) for g in done]
        ax.errorbar(lrs, [s.mean for s in stats], yerr=[s.sd or 0.0 for s in stats], marker="o", capsize=4)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (train.lr)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    best = min(done, key=lambda g: g.loss.mean)
    axes[0].axvline(best.get("train.lr"), color="green", ls="--", lw=1, label=f"best {best.get('train.lr'):g}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: final metrics vs LR (mean ± sd over seeds)")
    return save(fig, path)
