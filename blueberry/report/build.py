"""`blueberry report`: load runs (local records or W&B, through the cache), then write under `out/`:

  REPORT.md          the study's tables per experiment, statistics, plots, integrity, run status
  TIMELINE.md        dated entries computed from runs (also insertable into README.md between markers)
  dashboard.html     one self-contained comparison page
  <experiment>/*.png plots

Everything is written into a staging directory first and moved into place at the end, so a failed
build leaves the previous report intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blueberry.fileio import exclusive_lock, read_json, write_text_atomic
from blueberry.report import claims, dashboard, plots, tables
from blueberry.report.groups import fmt_value, group_runs, label_groups, rank, varying_keys
from blueberry.report.integrity import integrity_section, priced_costs
from blueberry.report.records import ReportError, Run, need_wandb_credentials
from blueberry.report.studies import Study, extended_experiment, report_order, study_for
from blueberry.report.timeline import build_timeline, insert_between_markers, timeline_markdown
from blueberry.spec import safe_name
from blueberry.tracking.preflight import PreflightError, check_writable_dir


@dataclass
class BuildResult:
    files: list[Path] = field(default_factory=list)
    states: Counter = field(default_factory=Counter)
    timeline: str = ""
    figures: dict = field(default_factory=dict)  # {"reused": n, "drawn": n} PNGs
    sections: dict[str, str] = field(default_factory=dict)  # each experiment's markdown, by name


def write_report_file(path: Path, text: str) -> None:
    """Atomically, its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


# What a build writes at the top of --out besides the experiments' plot folders (compared case-blind: macOS).
OWN_ENTRIES = ("REPORT.md", "TIMELINE.md", "dashboard.html", "cache")


def plot_folder(experiment: str) -> str:
    """The folder of an experiment's plots under --out: its name, unless the build's own files take it."""
    name = safe_name(experiment)
    return f"{name}-plots" if name.casefold() in {entry.casefold() for entry in OWN_ENTRIES} else name


def _images(stage: Path, exp_dir: str, made: list[Path | None]) -> str:
    links = [f"![{p.stem.replace('_', ' ')}]({p.relative_to(stage).as_posix()})" for p in made if p is not None]
    return ("\n".join(links) + "\n") if links else f"*(no plots: no finished run with history in `{exp_dir}`)*\n"


def _plot(jobs: list, figure: plots.Figure | None, path: Path) -> Path | None:
    """Queue `figure` to be drawn at `path` (by render_all, once the markdown is written)."""
    if figure is None:
        return None
    jobs.append((figure, path))
    return path


def _plots(groups, stage: Path, sub: str, title: str, jobs: list, bars: bool = True) -> list[Path | None]:
    """Val loss vs step and vs wall time, the 2×2 training curves, and bars of final val loss and tokens/s."""
    d = stage / sub
    made = [
        _plot(jobs, plots.val_loss_curves(groups, title, x="step"), d / "val_loss_vs_step.png"),
        _plot(jobs, plots.val_loss_curves(groups, title, x="time"), d / "val_loss_vs_time.png"),
        _plot(jobs, plots.curves_2x2(groups, title), d / "training_curves.png"),
    ]
    if bars:
        made += [
            _plot(jobs, plots.bars(groups, "val/loss", title, "final val loss"), d / "final_val_loss.png"),
            _plot(jobs, plots.bars(groups, "perf/tokens_per_s", title, "tokens/s"), d / "tokens_per_s.png"),
        ]
    return made


def _lr_parts(experiment: str, study: Study, runs: list[Run], all_runs: dict, stage: Path, jobs: list) -> list[str]:
    """One LR table per setting of everything else (usually one), then the T3 phases with the extended run."""
    parts = []
    sweeps = tables.lr_groups(runs)
    # what sets the sweeps apart (each one's first group stands for it; the LR varies within every sweep)
    differing = [k for k in varying_keys([groups[0] for groups in sweeps]) if k != "train.lr"]
    for i, groups in enumerate(sweeps):
        label_groups(groups, first="train.lr")
        sub = plot_folder(experiment) if len(sweeps) == 1 else f"{plot_folder(experiment)}/sweep{i + 1}"
        if len(sweeps) > 1:
            parts.append("### " + ", ".join(f"{k}={fmt_value(groups[0].get(k))}" for k in differing) + "\n")
        made = [_plot(jobs, plots.lr_sweep(groups, experiment), stage / sub / "lr_sweep.png")]
        made += _plots(rank(groups), stage, sub, experiment, jobs, bars=False)
        parts += [tables.lr_table(groups)[0], _images(stage, sub, made)]
    ext_name = extended_experiment(experiment, study)
    if ext_name in all_runs:
        lr_search = sorted(group_runs(runs), key=lambda g: g.get("train.lr") or 0.0)
        parts.append(f"### Phases: LR search and extended run (`{ext_name}`)\n")
        parts.append(tables.phase_table(lr_search, group_runs(all_runs[ext_name][1])))
    return parts


def _extended_parts(experiment: str, runs: list[Run], stage: Path, jobs: list) -> list[str]:
    parts = []
    groups = group_runs(runs)
    label_groups(groups, first="train.lr")
    for i, g in enumerate(groups):
        sub = plot_folder(experiment) if len(groups) == 1 else f"{plot_folder(experiment)}/config{i + 1}"
        if len(groups) > 1:
            parts.append(f"### {g.label}\n")
        targets = tables.checkpoint_steps(g.ok[0])[0] if g.ok else []
        figure = plots.curves_2x2([g], experiment, checkpoints=targets)
        made = [_plot(jobs, figure, stage / sub / "training_curves.png")]
        parts += [tables.extended_table(g), _images(stage, sub, made)]
    return parts


def experiment_section(experiment: str, study: Study, runs: list[Run], all_runs: dict, stage: Path, jobs: list) -> str:
    """One experiment's markdown: the layout its study kind calls for, plots (queued on `jobs`), and the runs
    not aggregated."""
    states = Counter(r.state for r in runs)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    parts = [f"## {study.title}: `{experiment}`\n", f"{len(runs)} runs ({counts}).\n"]
    if study.kind == "lr":
        parts += _lr_parts(experiment, study, runs, all_runs, stage, jobs)
    elif study.kind == "extended":
        parts += _extended_parts(experiment, runs, stage, jobs)
    else:
        text, ranked = (tables.ablation_table if study.kind == "ablation" else tables.generic_table)(runs)
        sub = plot_folder(experiment)
        parts += [text, _images(stage, sub, _plots(ranked, stage, sub, experiment, jobs))]
    parts.append(tables.not_aggregated(runs))
    return "\n".join(p for p in parts if p)


def _of(value, kind: type, default):
    """`value` if it is a `kind`, else `default`: a study record is read as found, never trusted."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else default


_RECORD_FIELDS = (("command", str), ("kind", str), ("parallel", int), ("ended", str))


def _bf16_instructions(cpu: dict) -> str:
    """The CPU's bf16 instructions as its record's `hardware.CpuInfo` flags give them (AMX, AVX512-BF16, none;
    nothing where the record lacks them): the kind of CPU fixes its matmul kernels' order of sums, so the
    routed presets' losses from another kind differ in the 3rd-4th decimal (README, "The study")."""
    if cpu.get("amx") is True:
        return ", AMX"
    if cpu.get("bf16") is True:
        return ", AVX512-BF16"
    return ", no bf16 instructions" if cpu.get("bf16") is False else ""


def study_section(records: list[dict], runs: list[Run], costs: list[float] = ()) -> str:
    """How the runs were made: each `blueberry study` record (command, commit, machine, wall time) and the
    runs' summed training time and cost (`costs`: those of the runs with one, as the Integrity table gives
    them). A record field of the wrong type shows as "?"."""
    lines = []
    for record in records:
        code, machine = _of(record.get("code"), dict, {}), _of(record.get("machine"), dict, {})
        cpu = _of(machine.get("cpu"), dict, {})
        gpus = [g for g in _of(machine.get("gpus"), list, []) if isinstance(g, dict)]
        where = ", ".join(str(g.get("name", "?")) for g in gpus)
        where = where or f"{cpu.get('model', '?')} ({cpu.get('cores', '?')} cores{_bf16_instructions(cpu)})"
        dirty = " (with local changes)" if code.get("git_dirty") is True else ""
        parts = [p for p in _of(record.get("parts"), list, []) if isinstance(p, dict)]
        trials = sum(_of(p.get("finished"), int, 0) for p in parts)
        wall = _of(record.get("wall_s"), (int, float), None)
        wall_text = "?" if wall is None else f"{wall / 60:.1f} min"
        command, kind, parallel, ended = (_of(record.get(k), t, "?") for k, t in _RECORD_FIELDS)
        sha = _of(code.get("git_sha"), str, None)
        # a recorded null: run from an installed copy (pip install .); no code record at all: unknown
        commit = f"commit `{sha}`{dirty}" if sha else "code outside a git checkout" if "git_sha" in code else "?"
        if not sha and isinstance(code.get("git_error"), str):  # a checkout whose commit git could not tell
            commit = f"a checkout whose commit is unknown ({code['git_error']})"
        lines += [  # command, machine and parallelism are the last invocation's; the times, every invocation's
            f"- `{command}` on {kind} (the last invocation): {where}, {parallel} trial(s) at once",
            f"  - last run from {commit}, finished {ended}",
            f"  - {trials} trials finished in {len(parts)} parts; wall time {wall_text}",
        ]
    created = sorted(str(r.header.get("created_at")) for r in runs if r.header.get("created_at"))
    if created:
        lines.append(f"- Runs started between {created[0]} and {created[-1]} (their records' `created_at`)")
    train_s = sum(r.metric("time/train_s") or 0.0 for r in runs)
    cost = f"${sum(costs):.2f} over {len(costs)} runs with a price" if costs else "no cost (no price for this device)"
    lines.append(f"- All {len(runs)} runs: {train_s / 60:.1f} min of training (summed over runs), {cost}")
    return "\n".join(lines) + "\n"


def runs_appendix(by_experiment: dict) -> str:
    """Every run id with its configuration, seed, state and final val loss: what each number above traces to."""
    rows = []
    for name in sorted(by_experiment, key=report_order):
        groups = group_runs(by_experiment[name][1])
        label_groups(groups, first="model.variant")
        for g in groups:
            for r in g.runs:
                loss = r.metric("val/loss")
                rows.append([f"`{r.id}`", name, g.label, str(r.seed), r.state, "—" if loss is None else f"{loss:.4f}"])
    return tables.md_table(["Run", "Experiment", "Configuration", "Seed", "State", "Val loss"], rows) if rows else ""


def report_markdown(
    runs: list[Run],
    stage: Path,
    by_experiment: dict,
    timeline: str,
    integrity: str,
    source: str,
    jobs: list,
    study_records: list[dict] = (),
    sections: dict | None = None,
    costs: list[float] = (),
) -> str:
    states = Counter(r.state for r in runs)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    lines = [
        "# Blueberry study report\n",
        f"*Generated by `blueberry report` from {len(runs)} runs ({source}); every number below comes from the "
        "recorded runs. Cells are mean ± sample sd over seeds; a configuration is a spec up to its seed.*\n",
        f"Runs: {summary}. Interactive comparison: [dashboard.html](dashboard.html). "
        "Timeline: [TIMELINE.md](TIMELINE.md).\n",
    ]
    if not runs:
        lines.append("*No runs found.*\n")
    lines.append("## Contents\n")
    ordered = sorted(by_experiment, key=report_order)
    claimed = claims.claims_section(by_experiment)
    lines += ["- How these runs were made"] + (["- The original report's claims, measured"] if claimed else [])
    lines += [f"- {by_experiment[name][0].title}: `{name}`" for name in ordered]
    lines += ["- Timeline", "- Integrity", "- Runs", ""]
    lines += ["## How these runs were made\n", study_section(list(study_records), runs, costs)]
    if claimed:
        lines += ["## The original report's claims, measured\n", claimed]
    sections = {} if sections is None else sections
    for name in ordered:
        study, exp_runs = by_experiment[name]
        sections[name] = experiment_section(name, study, exp_runs, by_experiment, stage, jobs)
        lines.append(sections[name])
    lines += ["## Timeline\n", timeline, "## Integrity\n", integrity]
    local = source.startswith("local")
    where = source + ("; a local run's record is `<runs root>/<experiment>/<id>/`" if local else "")
    lines += ["## Runs\n", f"Every run behind the tables, by id ({where}).\n"]
    lines.append(runs_appendix(by_experiment))
    return "\n".join(lines)


def build_report(
    runs: list[Run],
    out: str | Path,
    *,
    prices: dict[str, float],
    price_source: str = "defaults",
    readme: str | Path | None = None,
    source: str = "local run records",
    plot_cache: Path | None = None,
    study_records: list[dict] = (),
) -> BuildResult:
    """Write the report under `out`. `plot_cache`: where PNGs are kept between builds (None: draw every one);
    `study_records`: what `blueberry study` recorded about how the runs were made."""
    out = Path(out)
    readme_text = _readme_with_markers(readme)  # before writing anything

    by_experiment: dict[str, tuple[Study, list[Run]]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, (study_for(run.experiment), []))[1].append(run)
    entries, skipped = build_timeline(by_experiment)
    timeline = timeline_markdown(entries, skipped, len(runs))

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))
    try:
        integrity = integrity_section(runs, prices, price_source)
        jobs: list[tuple[plots.Figure, Path]] = []
        sections: dict[str, str] = {}
        markdown = report_markdown(
            runs, stage, by_experiment, timeline, integrity, source, jobs, study_records, sections,
            costs=priced_costs(runs, prices, price_source),
        )  # fmt: skip
        write_report_file(stage / "REPORT.md", markdown)
        figures = plots.render_all(jobs, plot_cache)
        write_report_file(stage / "TIMELINE.md", "# Timeline\n\n" + timeline)
        title = f"{len(runs)} runs from {source}"
        write_report_file(stage / "dashboard.html", dashboard.render(runs, title))
        states = Counter(r.state for r in runs)
        result = BuildResult(states=states, timeline=timeline, figures=figures, sections=sections)
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            result.files.append(target)
        _remove_stale(out, {str(f.relative_to(out)) for f in result.files})
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if readme_text is not None:
        write_report_file(Path(readme), insert_between_markers(readme_text, timeline))
        result.files.append(Path(readme))
    return result


MANIFEST = ".report-files"  # under out/: what the last build wrote there


def _remove_stale(out: Path, written: set[str]) -> None:
    """Remove what the previous build wrote and this one did not (an experiment gone, a plot no longer drawn),
    then its emptied folders; anything else in `out` (the cache, other tools' files) is left alone."""
    previous = read_json(out / MANIFEST) or {}
    listed = previous.get("files")
    for name in {n for n in listed if isinstance(n, str)} - written if isinstance(listed, list) else ():
        path = out / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            continue
        path.unlink()
        for folder in path.parents:
            if folder == out or any(folder.iterdir()):
                break
            folder.rmdir()
    write_report_file(out / MANIFEST, json.dumps({"files": sorted(written)}, indent=1) + "\n")


def run_report(
    *,
    source: str = "local",
    runs_root: str | Path = "runs",
    entity: str | None = None,
    project: str | None = None,
    group: str | None = None,
    sweep: str | None = None,
    tags: tuple[str, ...] = (),
    out: str | Path = "reports",
    gpu_prices: str | None = None,
    readme: str | Path | None = None,
    publish: bool = False,
    log=print,
) -> BuildResult:
    """What `blueberry report` does: load (through the cache), build, optionally publish to W&B."""
    from blueberry.report.cache import RunCache
    from blueberry.report.integrity import gpu_prices as load_prices
    from blueberry.report.records import load_local, load_wandb, select

    prices, price_source = load_prices(gpu_prices)
    records: list[dict] = []
    if (source == "wandb" or publish) and not entity:
        raise ReportError(
            f"{'--source wandb' if source == 'wandb' else '--publish'} needs --entity (the W&B user or team)"
        )
    if source == "wandb" and not project:
        raise ReportError("--source wandb needs --project")
    if source == "wandb":
        need_wandb_credentials("--source wandb")
    try:  # where it writes, before the runs are read (the cache lives under --out too)
        check_writable_dir(out, "--out")
    except PreflightError as exc:
        raise ReportError(str(exc)) from None
    _readme_with_markers(readme)
    cache = RunCache(Path(out) / "cache" / ("local" if source == "local" else f"wandb-{entity}-{project}"))
    if source == "wandb":
        runs = load_wandb(entity, project, group=group, sweep=sweep, tags=tags, cache=cache)
        where = f"W&B {entity}/{project}"
    else:
        runs = select(load_local(runs_root, cache), group=group, sweep=sweep, tags=tags)
        where = f"local run records under {runs_root}"
        records = [r for p in sorted(Path(runs_root).glob("_study/*.json")) if (r := read_json(p))]
    log(f"{len(runs)} runs ({where}); cache: {cache.hits} reused, {cache.misses} parsed")
    if not runs and (group or sweep or tags):  # a typo in a filter must not empty the last build's report
        asked = ", ".join(f"--{k} {v}" for k, v in (("group", group), ("sweep", sweep), ("tag", ", ".join(tags))) if v)
        raise ReportError(f"no runs match {asked} in {where}; nothing written")
    if not runs and (read_json(Path(out) / MANIFEST) or {}).get("files"):  # a --runs-root one folder too deep
        raise ReportError(
            f"no runs in {where} (a runs root holds <experiment>/<run_id>/ folders); the report in {out} was left "
            "as it was (delete it to publish an empty one)"
        )
    result = _one_build_at_a_time(
        runs,
        out,
        log,
        cache.root.parent,
        prices=prices,
        price_source=price_source,
        readme=readme,
        source=where,
        study_records=records if source == "local" else [],
    )
    states = ", ".join(f"{n} {s}" for s, n in sorted(result.states.items())) or "no runs"
    figures = f"{result.figures.get('drawn', 0)} plots drawn, {result.figures.get('reused', 0)} unchanged"
    log(f"report: {Path(out) / 'REPORT.md'} ({states}); {len(result.files)} files written ({figures})")
    if publish:
        from blueberry.report.publish import publish as save_report
        from blueberry.report.publish import report_definition

        projects = {project for r in runs if (project := _wandb_project(r))}
        project = project or (projects.pop() if len(projects) == 1 else "blueberry")
        definition = report_definition(runs, entity, project)
        panels = sum(len(getattr(b, "panels", [])) for b in definition.blocks)
        log(f"W&B Report definition built: {len(definition.blocks)} blocks, {panels} panels ({entity}/{project})")
        log(f"W&B Report saved: {save_report(definition)}")
    return result


def _one_build_at_a_time(runs: list[Run], out: str | Path, log, cache: Path, **options) -> BuildResult:
    """build_report into `out`, its plots cached under `cache`, while holding `cache`/build.lock: two builds into
    one --out take turns, as each removes what it did not use (cached PNGs, the last build's files)."""
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / "build.lock", required=False) as locked:
        if not locked:  # a file system without locks: build anyway
            log(f"warning: {cache / 'build.lock'} cannot be locked here: two builds into {out} at once would clash")
        return build_report(runs, out, plot_cache=cache / "plots", **options)


def _readme_with_markers(readme: str | Path | None) -> str | None:
    """The text of the --readme file, which must hold the timeline markers (ReportError if not); None if unset."""
    if readme is None:
        return None
    try:
        text = Path(readme).read_text(encoding="utf-8")
        insert_between_markers(text, "")
    except (OSError, ValueError) as exc:
        raise ReportError(f"--readme {readme}: {exc}") from exc
    return text


def _wandb_project(run) -> str | None:
    """The W&B project a run logged to: its header's resolved value (spec, W&B's settings or our default)."""
    chosen = (run.header.get("wandb") or {}).get("project")
    return chosen.get("value") if isinstance(chosen, dict) else run.get("tracking.project")
