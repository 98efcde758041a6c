import json

from blueberry.tracking import RunRecord, allocate_run_dir, read_metrics


def test_record_files_and_states(tmp_path):
    run_dir = allocate_run_dir(tmp_path, "exp", "run-a")
    record = RunRecord(run_dir, {"spec": {"seed": 1}})
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    record.log({"train/loss": 2.5}, step=1)
    record.log({"train/loss": float("nan")}, step=2)
    record.summary({"val/loss": 2.0})
    record.finish("finished")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["train/loss"] == 2.5
    assert rows[1]["train/loss"] == "nan"  # still valid JSON
    assert json.loads((run_dir / "summary.json").read_text()) == {"val/loss": 2.0}
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert json.loads((run_dir / "spec.json").read_text()) == {"spec": {"seed": 1}}


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_taken_run_ids_get_a_suffix(tmp_path):
    first = allocate_run_dir(tmp_path, "exp", "same")
    second = allocate_run_dir(tmp_path, "exp", "same")
    assert (first.name, second.name) == ("same", "same-2")


def test_names_cannot_escape_the_runs_root(tmp_path):
    run_dir = allocate_run_dir(tmp_path / "runs", "../../etc", "../x")
    assert (tmp_path / "runs") in run_dir.parents
