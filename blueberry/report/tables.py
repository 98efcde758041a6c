"""Markdown tables in the study's layouts (README, "Reports"): T1 ablation, T2 LR sweep, T3 phases,
the extended run's checkpoints, and a generic table for any other experiment."""

from __future__ import annotations

import math

import numpy as np

from blueberry.models import registry
from blueberry.report.groups import Group, Stat, gap_vs_noise, group_runs, label_groups, rank
from blueberry.report.records import Run

# LR assessment: share of the best configuration's improvement over the unigram baseline that a
# configuration achieves, (unigram − loss) / (unigram − best loss).
ASSESSMENT = ((0.95, "Near best"), (0.75, "Good"), (0.40, "Moderate"), (0.0, "Poor convergence"))


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    """One table cell: a line of its own (a multi-line failure reason would end the table), `|` escaped, and no
    raw HTML from run ids or reasons (`<` as `&lt;`)."""
    return " ".join(str(value).split("\n")).replace("\r", " ").replace("|", "\\|").replace("<", "&lt;")


def fmt_loss(s: Stat) -> str:
    return s.fmt(".4f")


def fmt_acc(s: Stat) -> str:
    return s.fmt(".2f", 100, "%")


def fmt_ppl(s: Stat) -> str:
    return s.fmt(".2f")


def fmt_params(count: float | None) -> str:
    return "—" if count is None else f"{count / 1e6:.2f}"


def fmt_lr(lr: float | None) -> str:
    """3e-3 (0.003), as the study prints LRs."""
    if lr is None:
        return "—"
    mantissa, exponent = f"{lr:.3e}".split("e")
    decimal = f"{lr:.12f}".rstrip("0").rstrip(".")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)} ({decimal})"


def metric_cells(g: Group) -> list[str]:
    return [fmt_loss(g.loss), fmt_acc(g.stat("val/accuracy")), fmt_ppl(g.stat("val/perplexity"))]


def noise_cells(ranked: list[Group]) -> list[str]:
    """Per rank: is the gap to the next rank larger than the noise (2 SE of the difference of means)?"""
    cells = []
    for i, g in enumerate(ranked):
        nxt = ranked[i + 1] if i + 1 < len(ranked) else None
        if not g.ok or nxt is None or not nxt.ok:
            cells.append("—")
            continue
        gap, noise = gap_vs_noise(g.loss, nxt.loss)
        if noise is None:
            cells.append(f"{gap:.4f} (noise n/a: 1 seed)")
        elif gap > noise:
            cells.append(f"yes: {gap:.4f} > {noise:.4f}")
        else:
            cells.append(f"no: {gap:.4f} ≤ {noise:.4f}")
    return cells


def _stat_line(name: str, values: list[float], spec: str, unit: str = "", scale: float = 1.0) -> str:
    s = Stat([v * scale for v in values])
    sd = f" ± {s.sd:{spec}}{unit}" if s.sd is not None else ""
    return (
        f"- {name}: mean {s.mean:{spec}}{unit}{sd}, range {min(s.values):{spec}}{unit} – {max(s.values):{spec}}{unit}"
    )


def statistics(groups: list[Group]) -> str:
    """The study's statistics block, over the configurations' mean values."""
    done = [g for g in groups if g.ok]
    if len(done) < 2:
        return ""
    loss = [g.loss.mean for g in done]
    acc = [g.stat("val/accuracy").mean for g in done if g.stat("val/accuracy").mean is not None]
    minutes = [g.minutes.mean for g in done if g.minutes.mean is not None]
    params = [g.params("total") for g in done if g.params("total")]
    lines = [f"**Statistics** over {len(done)} configurations (per-configuration means; ± is the sample sd):", ""]
    ratio = min(loss) / max(loss) if max(loss) > 0 else math.nan
    gap = f"{1 / ratio:.1f}x" if ratio > 0 else "n/a"  # nan > 0 is False too
    lines.append(_stat_line("Loss", loss, ".4f") + f", best/worst {ratio:.2f}x ({gap} gap)")
    if acc:
        lines.append(_stat_line("Accuracy", acc, ".2f", "%", 100))
    if minutes:
        spread = f"{max(minutes) / min(minutes):.1f}x" if min(minutes) > 0 else "n/a"  # a run of no recorded time
        lines.append(_stat_line("Time", minutes, ".2f", " min") + f", slowest/fastest {spread}")
    if params:
        line = _stat_line("Params", params, ".2f", " M", 1e-6)
        lines.append(line + f", largest/smallest {max(params) / min(params):.1f}x")
    return "\n".join(lines) + "\n"


def ablation_table(runs: list[Run]) -> tuple[str, list[Group]]:
    """T1: Rank | Configuration | Val Loss | Val Acc | Val Perp | Time (min) | Params (M) | Active (M) | Category."""
    groups = group_runs(runs)
    label_groups(groups, first="model.variant")
    ranked = rank(groups)
    seeded = any(g.loss.n >= 2 for g in ranked)
    # the optimizer split, from run headers that record it (runs since the one-recipe change)
    split = any(g.params("muon") is not None for g in ranked)
    headers = ["Rank", "Configuration", "Val Loss", "Val Acc", "Val Perp", "Time (min)", "Params (M)", "Active (M)"]
    headers += (["Muon / AdamW (M)"] if split else []) + ["Category", "Seeds"]
    headers += ["Gap to next > noise?"] if seeded else []
    noise = noise_cells(ranked) if seeded else []
    rows = []
    for i, g in enumerate(ranked):
        row = [str(i + 1) if g.ok else "—", g.label, *metric_cells(g), g.minutes.fmt(".2f")]
        row += [fmt_params(g.params("total")), fmt_params(g.params("active"))]
        row += [f"{fmt_params(g.params('muon'))} / {fmt_params(g.params('adamw'))}"] if split else []
        category = registry.category({k: g.get(f"model.{k}") for k in registry.CHOICE_FIELDS})
        row += [category, g.states] + ([noise[i]] if seeded else [])
        rows.append(row)
    return md_table(headers, rows) + "\n" + statistics(ranked), ranked


def _assess(g: Group, best: Group, unigram: float | None) -> str:
    if not g.ok:
        return "No result"
    if g is best:
        return "**Best**"
    gap, noise = gap_vs_noise(best.loss, g.loss)
    if noise is not None and gap <= noise:
        return "Within noise of best"
    if unigram is None or unigram <= best.loss.mean:
        return f"+{gap / best.loss.mean:.0%} loss vs best"
    share = (unigram - g.loss.mean) / (unigram - best.loss.mean)
    if share <= 0:
        return "Not learning (≥ unigram loss)"
    label = next(text for threshold, text in ASSESSMENT if share >= threshold)
    return f"{label} ({share:.0%})"


def lr_groups(runs: list[Run]) -> list[list[Group]]:
    """LR sweeps: one list of configurations per setting of everything but the LR, each sorted by LR."""
    groups = group_runs(runs)
    by_rest: dict[str, list[Group]] = {}
    for g in groups:
        rest = {k: v for k, v in g.config.items() if k != "train.lr"}
        by_rest.setdefault(repr(sorted(rest.items(), key=str)), []).append(g)
    return [sorted(gs, key=lambda g: g.get("train.lr") or 0.0) for gs in by_rest.values()]


def lr_table(groups: list[Group]) -> tuple[str, Group | None]:
    """T2: Learning Rate | Val Loss | Val Accuracy | Val Perplexity | Seeds | Assessment, best LR, edge warning."""
    done = [g for g in groups if g.ok]
    best = rank(done)[0] if done else None
    unigrams = [r.metric("unigram_loss") for g in done for r in g.ok if r.metric("unigram_loss") is not None]
    unigram = float(np.mean(unigrams)) if unigrams else None
    headers = ["Learning Rate", "Val Loss", "Val Accuracy", "Val Perplexity", "Seeds", "Assessment"]
    rows = []
    for g in groups:
        lr = fmt_lr(g.get("train.lr"))
        rows.append([f"**{lr}**" if g is best else lr, *metric_cells(g), g.states, _assess(g, best, unigram)])
    text = md_table(headers, rows) + "\n"
    if best is None:
        return text + "No LR finished: no best LR.\n", None
    text += f"Best LR: **{fmt_lr(best.get('train.lr'))}** (val loss {fmt_loss(best.loss)}).\n"
    if unigram is not None:
        text += f"Assessment %: share of the best LR's improvement over the unigram loss ({unigram:.4f}) reached.\n"
    lrs = [g.get("train.lr") for g in done]
    if len(lrs) >= 2 and best.get("train.lr") in (min(lrs), max(lrs)):
        side = "largest" if best.get("train.lr") == max(lrs) else "smallest"
        way = "above" if side == "largest" else "below"
        text += (
            f"\n> **Warning:** the best LR is the {side} one tried: the optimum may lie {way} the grid; "
            f"extend the grid {way} {fmt_lr(best.get('train.lr'))}.\n"
        )
    return text, best


def checkpoint_steps(run: Run) -> tuple[list[int], str]:
    """Checkpoint rows: the spec's checkpoint interval if it has one, else every quarter of the run."""
    steps = int(run.get("train.steps") or 0)
    every = run.get("train.checkpoint_every")
    if every:
        note = f"every {int(every):,} steps (train.checkpoint_every)"
    else:
        every = max(1, steps // 4)
        note = f"every 1/4 of the run ({every:,} steps; the spec has no checkpoint interval)"
    return [k * int(every) for k in range(1, steps // int(every) + 1) if k * int(every) < steps], note


def at_step(run: Run, target: int, metric: str) -> tuple[int | None, float | None, float | None]:
    """(eval step nearest to `target`, the metric there, wall minutes there)."""
    steps, values = run.history.series(metric)
    if not steps.size:
        return None, None, None
    i = int(np.argmin(np.abs(steps - target)))
    times, _ = run.history.series(metric, x="time")
    return int(steps[i]), float(values[i]), float(times[i]) / 60


def extended_table(group: Group) -> str:
    """Checkpoint | Eval step | Val Loss | Val Accuracy | Val Perplexity | Time (min), then the final row."""
    runs = group.ok
    if not runs:
        return f"No finished run ({group.states}).\n"
    targets, note = checkpoint_steps(runs[0])
    headers = ["Checkpoint", "Eval step", "Val Loss", "Val Accuracy", "Val Perplexity", "Time (min)"]
    rows = []
    for target in targets:
        cells = [[at_step(r, target, m) for r in runs] for m in ("val/loss", "val/accuracy", "val/perplexity")]
        eval_steps = sorted({c[0] for c in cells[0] if c[0] is not None})
        loss, acc, ppl = (Stat([c[1] for c in col if c[1] is not None]) for col in cells)
        minutes = Stat([c[2] for c in cells[0] if c[2] is not None])
        step_text = ", ".join(f"{s:,}" for s in eval_steps) or "—"
        rows.append([f"{target:,}", step_text, fmt_loss(loss), fmt_acc(acc), fmt_ppl(ppl), minutes.fmt(".2f")])
    final_step = f"{int(runs[0].get('train.steps') or 0):,}"
    rows.append(["final", final_step, *metric_cells(group), group.minutes.fmt(".2f")])
    return md_table(headers, rows) + f"\nCheckpoint rows: {note}; seeds: {group.states}.\n"


def phase_table(lr_search: list[Group], extended: list[Group]) -> str:
    """T3: Phase | Learning Rate | Val Loss | Val Accuracy | Val Perplexity."""
    headers = ["Phase", "Learning Rate", "Val Loss", "Val Accuracy", "Val Perplexity"]
    best = rank([g for g in lr_search if g.ok])[:1]
    rows = []
    for i, g in enumerate(lr_search):
        lr = fmt_lr(g.get("train.lr"))
        rows.append(["LR search" if i == 0 else "", f"**{lr}**" if g in best else lr, *metric_cells(g)])
    for i, g in enumerate(extended):
        rows.append(["Extended" if i == 0 else "", fmt_lr(g.get("train.lr")), *metric_cells(g)])
    return md_table(headers, rows)


def generic_table(runs: list[Run]) -> tuple[str, list[Group]]:
    """Configuration | Seeds | Val Loss | Val Acc | Val Perp | Time (min) | Params (M) | Active (M) | Tokens/s."""
    groups = group_runs(runs)
    label_groups(groups, first="model.variant")
    ranked = rank(groups)
    headers = ["Configuration", "Seeds", "Val Loss", "Val Acc", "Val Perp", "Time (min)", "Params (M)", "Active (M)"]
    headers.append("Tokens/s")
    rows = []
    for g in ranked:
        row = [g.label, g.states, *metric_cells(g), g.minutes.fmt(".2f")]
        row += [fmt_params(g.params("total")), fmt_params(g.params("active")), g.stat("perf/tokens_per_s").fmt(".0f")]
        rows.append(row)
    return md_table(headers, rows), ranked


def not_aggregated(runs: list[Run]) -> str:
    """Runs the tables do not average (failed, running, unreadable, no final val loss): listed, never dropped."""
    rest = [r for r in runs if not r.ok]
    if not rest:
        return ""
    rows = []
    for r in rest:
        step = r.history.last_step
        reason = r.reason or ""
        if r.state == "finished":
            reason = "no spec in the run's config" if not r.spec else "no final val/loss in the summary"
        rows.append([r.id, r.state, reason, "—" if step is None else f"{step:,}", f"`{r.source}`"])
    head = f"Runs not aggregated above ({len(rest)}):\n\n"
    return head + md_table(["Run", "State", "Reason", "Last step", "Source"], rows)
