"""The report's provenance: how the runs were made (a `blueberry study` record) and every run by id."""

import json

import pytest

from blueberry.report.build import run_report, study_section
from blueberry.report.synthetic import write_run


def test_report_says_how_the_runs_were_made_and_lists_every_run(tmp_path):
    runs = tmp_path / "runs"
    ids = [
        write_run(runs, "exp1-ablation-cpu", variant=v, seed=s, minutes=2.0).name
        for v in ("mlp", "moe")
        for s in (1, 2)
    ]
    record = {
        "command": "blueberry study",
        "kind": "cpu",
        "parallel": 2,
        "code": {"git_sha": "abc123", "git_dirty": False},
        "machine": {"cpu": {"model": "Test CPU", "cores": 2}, "gpus": []},
        "started": "2026-12-02T05:34:00+00:00",
        "ended": "2026-12-02T06:40:00+00:00",
        "parts": [{"name": "exp1", "finished": 4, "wall_s": 300.0}],
        "wall_s": 300.0,
    }
    (runs / "_study").mkdir()
    (runs / "_study" / "cpu.json").write_text(json.dumps(record))
    run_report(runs_root=runs, out=tmp_path / "out", log=lambda _: None)
    text = (tmp_path / "out" / "REPORT.md").read_text()
    made = text.split("## How these runs were made\n")[1].split("\n## ")[0]
    assert "`blueberry study` on cpu (the last invocation): Test CPU (2 cores), 2 trial(s) at once" in made
    assert "last run from commit `abc123`, finished 2026-12-02T06:40:00+00:00" in made
    assert "- Runs started between 2025-09-25T12:00:00+0000 and 2025-09-25T12:00:00+0000" in made
    assert "4 trials finished in 1 parts; wall time 5.0 min" in made
    assert "All 4 runs: 8.0 min of training (summed over runs), no cost" in made
    appendix = text.split("## Runs\n")[1]
    assert all(f"`{run_id}`" in appendix for run_id in ids)
    assert "| exp1-ablation-cpu | moe | 2 | finished | 4.0000 |" in appendix


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ({"bf16": True, "amx": True}, "Xeon (2 cores, AMX)"),
        ({"bf16": True, "amx": False}, "EPYC (2 cores, AVX512-BF16)"),
        ({"bf16": False, "amx": False}, "EPYC (2 cores, no bf16 instructions)"),
        ({}, "EPYC (2 cores)"),  # a record from before the flags, or one whose flags are not booleans
        ({"bf16": "yes", "amx": [1]}, "EPYC (2 cores)"),
    ],
)
def test_the_study_line_names_the_cpus_bf16_instructions(flags, said):
    """The kind of CPU fixes the order of its matmuls' sums: the study's numbers are that kind's."""
    model = "Xeon" if flags.get("amx") is True else "EPYC"
    record = {"command": "blueberry study", "kind": "cpu", "machine": {"cpu": {"model": model, "cores": 2, **flags}}}
    assert f"(the last invocation): {said}, ? trial(s) at once" in study_section([record], runs=[])


def test_show_prints_an_experiments_tables_without_its_images(tmp_path):
    from click.testing import CliRunner

    from blueberry.cli import main

    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, "exp1-ablation-cpu", variant="mlp", seed=seed)
    args = ["report", "--runs-root", str(runs), "--out", str(tmp_path / "out"), "--show", "exp1-ablation-cpu"]
    result = CliRunner().invoke(main, [*args, "--show", "nope", "--show", "exp1-ablation-gpu"])
    assert result.exit_code == 0, result.output
    assert "| 1 | mlp | 4.0000 ± 0.0000 |" in result.output and "![" not in result.output
    assert "(no runs of experiment 'nope'; experiments with runs: exp1-ablation-cpu)" in result.output
    assert "(no runs of experiment 'exp1-ablation-gpu'; did you mean 'exp1-ablation-cpu'?)" in result.output


def test_a_study_record_of_the_wrong_shape_is_shown_as_found_not_a_crash(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "exp1-ablation-cpu", variant="mlp")
    (runs / "_study").mkdir()
    bad = {"command": "blueberry study", "code": "abc", "machine": {"cpu": [1], "gpus": "none"}}
    (runs / "_study" / "cpu.json").write_text(json.dumps({**bad, "parts": [3, {"finished": "2"}], "wall_s": "long"}))
    (runs / "_study" / "cuda.json").write_text("[1, 2]")  # valid JSON, not a record: left out
    run_report(runs_root=runs, out=tmp_path / "out", log=lambda _: None)
    made = (tmp_path / "out" / "REPORT.md").read_text().split("## How these runs were made\n")[1].split("\n## ")[0]
    # a missing field reads "?"
    assert "`blueberry study` on ? (the last invocation): ? (? cores), ? trial(s) at once" in made
    assert "last run from ?, finished ?" in made  # a code record of the wrong shape: unknown
    assert "0 trials finished in 1 parts; wall time ?" in made
    assert made.count("- `blueberry study`") == 1


def test_a_study_run_from_an_installed_copy_says_so_where_a_commit_would_be(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "exp1-ablation-cpu", variant="mlp")
    (runs / "_study").mkdir()
    record = {"command": "blueberry study", "code": {"git_sha": None, "git_dirty": None}, "parts": []}
    (runs / "_study" / "cpu.json").write_text(json.dumps(record))  # what pip install . records
    run_report(runs_root=runs, out=tmp_path / "out", log=lambda _: None)
    assert "last run from code outside a git checkout, finished ?" in (tmp_path / "out" / "REPORT.md").read_text()


def test_a_study_run_from_a_checkout_git_could_not_read_says_why(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "exp1-ablation-cpu", variant="mlp")
    (runs / "_study").mkdir()
    code = {"git_sha": None, "git_dirty": None, "git_error": "fatal: detected dubious ownership in repository"}
    (runs / "_study" / "cpu.json").write_text(json.dumps({"command": "blueberry study", "code": code, "parts": []}))
    run_report(runs_root=runs, out=tmp_path / "out", log=lambda _: None)
    made = (tmp_path / "out" / "REPORT.md").read_text()
    assert "last run from a checkout whose commit is unknown (fatal: detected dubious ownership in repository)" in made
