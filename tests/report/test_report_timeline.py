"""Timeline entries: the T4 README's arithmetic, computed from runs against a named baseline."""

import pytest

from blueberry.report.records import load_local
from blueberry.report.studies import study_for
from blueberry.report.synthetic import write_run
from blueberry.report.timeline import (
    END,
    START,
    build_timeline,
    change_line,
    insert_between_markers,
    timeline_markdown,
)


def test_change_is_relative_to_the_baseline():
    # The T4 README: "6.5% validation loss improvement (7.2785 → 6.8076)" = (a − b) / a.
    assert change_line(7.2785, 6.8076, "validation loss") == "**6.5% validation loss improvement** (7.2785 → 6.8076)"
    assert change_line(6.8076, 7.2785, "validation loss") == "**6.9% validation loss regression** (6.8076 → 7.2785)"


def by_experiment(runs):
    out = {}
    for run in runs:
        out.setdefault(run.experiment, (study_for(run.experiment), []))[1].append(run)
    return out


def test_t4_style_entry_from_runs(tmp_path):
    # The README's ablation entry as runs: baseline = experiments/t4_preset.json (accumulation 3, dropout 0.1).
    base = {"train": {"grad_accum": 3}, "model": {"dropout": 0.1}}
    best = {"train": {"grad_accum": 2}, "model": {"dropout": 0.05}}
    for seed in (1, 2):
        for spec, loss, accuracy, perplexity, day in (
            (base, 7.2785, 0.1158, 1448.82, "2025-09-24T10:00:00+0000"),
            (best, 6.8076, 0.1425, 904.73, "2025-09-25T09:00:00+0000"),
        ):
            write_run(
                tmp_path,
                "t4-accum-dropout",
                seed=seed,
                spec=spec,
                val_loss=loss,
                val_accuracy=accuracy,
                val_perplexity=perplexity,
                created_at=day,
            )
    entries, skipped = build_timeline(by_experiment(load_local(tmp_path)))
    assert skipped == []
    text = timeline_markdown(entries, skipped, 4)
    assert "### Sep 25 2025" in text  # the date of the latest run compared
    assert "**6.5% validation loss improvement** (7.2785 → 6.8076)" in text
    # (b − a) / a for accuracy: (14.25 − 11.58) / 11.58 = 23.1 %; perplexity (a − b) / a = 37.6 %.
    assert "**23.1% accuracy improvement** (11.58% → 14.25%)" in text
    assert "**37.6% perplexity reduction** (1448.82 → 904.73)" in text
    assert "**Key change**: model.dropout: 0.1 → 0.05; train.grad_accum: 3 → 2" in text
    assert "loss gap 0.4709 larger than the noise" in text


def test_no_baseline_or_baseline_best_is_said_not_hidden(tmp_path):
    write_run(tmp_path, "exp2-lr-attention-mlp", lr=0.003, val_loss=4.0)
    write_run(tmp_path, "exp2-lr-attention-mlp", lr=0.001, val_loss=4.5)
    write_run(tmp_path, "exp1-ablation", variant="baseline", val_loss=3.0)
    write_run(tmp_path, "exp1-ablation", variant="mlp", val_loss=3.5)
    entries, skipped = build_timeline(by_experiment(load_local(tmp_path)))
    assert skipped == [("exp2-lr-attention-mlp", "no finished baseline configuration(s) (train.lr=0.01)")]
    text = timeline_markdown(entries, skipped, 4)
    assert "the baseline `baseline` stays best (2 configurations)" in text
    assert "- `exp2-lr-attention-mlp`: no finished baseline" in text


def test_timeline_goes_between_readme_markers():
    readme = f"# R\n\n## Timeline\n{START}\nold\n{END}\n\nrest\n"
    assert insert_between_markers(readme, "### Sep 25 2025\n- new") == (
        f"# R\n\n## Timeline\n{START}\n### Sep 25 2025\n- new\n{END}\n\nrest\n"
    )
    with pytest.raises(ValueError, match="markers"):
        insert_between_markers("# no markers\n", "x")
