"""Plots are drawn from their data alone: an unchanged figure is reused, a changed one redrawn, in parallel too."""

import hashlib
import json

from blueberry.report import plots
from blueberry.report.build import run_report
from blueberry.report.groups import group_runs, label_groups
from blueberry.report.records import load_local
from blueberry.report.synthetic import write_run


def ablation(root, variants=("baseline", "mlp"), seeds=(1, 2)):
    for i, variant in enumerate(variants):
        for seed in seeds:
            write_run(root, "exp1-ablation", variant=variant, seed=seed, val_loss=4.0 + i / 10 + seed / 100)


def pngs(out):
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in out.rglob("*.png")
        if "cache" not in p.parts
    }


def build(root, out):
    return run_report(runs_root=root, out=out, log=lambda msg: None)


def test_rebuild_reuses_every_unchanged_png_and_writes_the_same_files(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "reports"
    ablation(root)
    first = build(root, out)
    drawn = pngs(out)
    assert first.figures == {"reused": 0, "drawn": len(drawn)} and len(drawn) == 5
    second = build(root, out)
    assert second.figures == {"reused": 5, "drawn": 0}
    assert pngs(out) == drawn


def test_a_new_run_redraws_only_the_figures_of_its_experiment(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "reports"
    ablation(root)
    write_run(root, "notes-on-dropout", spec={"model": {"dropout": 0.0}}, val_loss=3.0)
    build(root, out)
    before = pngs(out)
    write_run(root, "exp1-ablation", variant="moe", seed=1, val_loss=3.9)
    result = build(root, out)
    after = pngs(out)
    changed = {name for name in after if before.get(name) != after[name]}
    assert changed and all(name.startswith("exp1-ablation/") for name in changed)
    assert result.figures == {"reused": 5, "drawn": 5}  # the other experiment's 5 untouched
    assert len(list((out / "cache" / "plots").glob("*.png"))) == len(after)  # stale PNGs pruned


def test_parallel_drawing_gives_the_same_pictures_as_drawing_in_turn(tmp_path, monkeypatch):
    ablation(tmp_path / "runs", variants=("baseline", "mlp", "moe"))
    groups = group_runs(load_local(tmp_path / "runs"))
    label_groups(groups)
    figures = [plots.val_loss_curves(groups, "t"), plots.curves_2x2(groups, "t")]
    figures += [plots.bars(groups, "val/loss", "t", "loss"), plots.bars(groups, "perf/tokens_per_s", "t", "tok/s")]
    jobs = [(f, tmp_path / "serial" / f"{i}.png") for i, f in enumerate(figures)]
    monkeypatch.setattr(plots, "MIN_PARALLEL", 10**6)
    assert plots.render_all(jobs, tmp_path / "cache-serial") == {"reused": 0, "drawn": 4}
    monkeypatch.setattr(plots, "MIN_PARALLEL", 1)
    monkeypatch.setattr(plots.os, "cpu_count", lambda: 2)
    jobs2 = [(f, tmp_path / "parallel" / f"{i}.png") for i, f in enumerate(figures)]
    assert plots.render_all(jobs2, tmp_path / "cache-parallel") == {"reused": 0, "drawn": 4}
    for (_, a), (_, b) in zip(jobs, jobs2):
        assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_key_follows_the_data_drawn_and_the_drawing_code(tmp_path, monkeypatch):
    ablation(tmp_path / "runs")
    groups = group_runs(load_local(tmp_path / "runs"))
    label_groups(groups)
    figure = plots.bars(groups, "val/loss", "t", "loss")
    assert figure.key() == plots.bars(groups, "val/loss", "t", "loss").key()
    assert figure.key() != plots.bars(groups, "val/loss", "other title", "loss").key()
    groups[0].runs[0].summary["val/loss"] += 1e-12  # any change in a drawn value is a new picture
    changed = plots.bars(groups, "val/loss", "t", "loss").key()
    assert figure.key() != changed
    # So is a change of the drawing code (colours, markers and axes live there, not in the data).
    monkeypatch.setattr(plots, "DRAWING_CODE", "other drawing code")
    assert changed != plots.bars(groups, "val/loss", "t", "loss").key()


def test_models_keep_their_category_colour_in_every_plot_and_an_lr_grid_is_coloured_by_rank(tmp_path):
    # The study's ablation plots colour curves by category, so a model's colour does not depend on
    # where it ranks or which other models the experiment holds.
    ablation(tmp_path / "a", variants=("mlp", "baseline", "moe"))
    ablation(tmp_path / "b", variants=("moe", "attention_moe"))
    slots = {}
    for root in ("a", "b"):
        groups = group_runs(load_local(tmp_path / root))
        label_groups(groups, "model.variant")
        figure = plots.val_loss_curves(groups, "t")
        for line in figure.data["lines"]:
            slots.setdefault(line["label"].split(" ")[0], set()).add(line["slot"])
    assert all(len(s) == 1 for s in slots.values()) and len({min(s) for s in slots.values()}) == len(slots)
    for lr in (1e-3, 3e-3):
        write_run(tmp_path / "lr", "exp2-lr-attention-mlp", variant="attention_mlp", lr=lr)
    groups = group_runs(load_local(tmp_path / "lr"))
    assert [line["slot"] for line in plots.val_loss_curves(groups, "t").data["lines"]] == [0, 1]


def test_with_more_categories_than_colours_a_plot_colours_by_rank(tmp_path, monkeypatch):
    """Slot 10 would take slot 0's colour (tab10): beyond ten presets two models in one plot could share one."""
    from dataclasses import replace

    from blueberry.models import registry

    ablation(tmp_path, variants=("baseline", "mlp"))
    groups = group_runs(load_local(tmp_path))
    assert [line["slot"] for line in plots.val_loss_curves(groups, "t").data["lines"]] == [0, 1]  # by category
    mlp_first = {"mlp": registry.PRESETS["mlp"], **registry.PRESETS}  # mlp's category slot is now 0
    many = {
        **mlp_first,
        **{f"x{i}": replace(registry.PRESETS["mlp"], name=f"x{i}", category=f"X{i}") for i in range(4)},
    }
    monkeypatch.setattr(registry, "PRESETS", many)
    slots = [line["slot"] for line in plots.val_loss_curves(groups, "t").data["lines"]]
    assert slots == [0, 1]  # by rank: baseline's category slot (1) is not used


def test_a_curve_of_a_few_evaluations_is_drawn_with_markers(tmp_path):
    # The CPU twin evaluates once at its end: a one-point line without a marker draws nothing at all.
    for root, eval_every, marker in (("once", 100, "o"), ("often", 10, "None")):
        write_run(tmp_path / root, "exp1-ablation", variant="mlp", steps=100, eval_every=eval_every)
        figure = plots.val_loss_curves(group_runs(load_local(tmp_path / root)), "t")
        (line,) = plots.DRAW[figure.kind](figure.data).axes[0].lines
        assert line.get_marker() == marker and len(line.get_xdata()) == (1 if marker == "o" else 10)


def test_an_lr_without_a_recorded_accuracy_leaves_only_its_accuracy_point_out_and_the_report_builds(tmp_path):
    root = tmp_path / "runs"
    for lr in (1e-2, 3e-2):
        run_dir = write_run(root, "t4-lr", variant="baseline", lr=lr, seed=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["val/accuracy"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    figure = plots.lr_sweep(group_runs(load_local(root)), "t")
    loss, accuracy = figure.data["panels"]
    assert (loss["lrs"], accuracy["lrs"]) == ([1e-2, 3e-2], [1e-2])
    plots.DRAW[figure.kind](figure.data)
    assert build(root, tmp_path / "out").figures["drawn"] >= 1
    assert (tmp_path / "out" / "t4-lr" / "lr_sweep.png").exists()


def test_a_curve_is_labelled_with_the_seeds_it_is_drawn_from(tmp_path):
    root = tmp_path / "runs"
    for seed in (1, 2, 3):
        run_dir = write_run(root, "exp1-ablation", variant="mlp", seed=seed)
    metrics = run_dir / "metrics.jsonl"  # seed 3 finished, but its history holds no val row
    rows = [row for row in metrics.read_text().splitlines() if "val/loss" not in row]
    metrics.write_text("\n".join(rows) + "\n")
    (line,) = plots.val_loss_curves(group_runs(load_local(root)), "t").data["lines"]
    assert line["label"].endswith("(n=2)") and line["band"]
