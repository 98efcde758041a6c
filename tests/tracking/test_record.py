import fcntl
import json
import os
import socket
import threading

from offline_tracker import fresh_run_dir

from blueberry.tracking import RunRecord, read_metrics
from blueberry.tracking.record import PROBE_GRACE_S, claim_run_dir, run_is_live


def test_record_files_and_states(tmp_path):
    run_dir = fresh_run_dir(tmp_path, "exp", "run-a")
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
    first = fresh_run_dir(tmp_path, "exp", "same")
    second = fresh_run_dir(tmp_path, "exp", "same")
    assert (first.name, second.name) == ("same", "same-2")


def test_names_cannot_escape_the_runs_root(tmp_path):
    run_dir = fresh_run_dir(tmp_path / "runs", "../../etc", "../x")
    assert (tmp_path / "runs") in run_dir.parents


def test_a_live_run_is_told_from_a_crashed_one_and_looking_never_costs_a_resume_its_directory(tmp_path):
    claimed = claim_run_dir(tmp_path, "exp", "run")
    RunRecord(claimed.path, {"spec": {}})  # status "running", on this host
    assert json.loads((claimed.path / "status.json").read_text())["host"] == socket.gethostname()
    assert run_is_live(claimed.path)
    claimed.release()  # the process dies without a word: its lock goes with it
    assert not run_is_live(claimed.path)

    # A report looking (a shared lock, held a moment) while the crashed run is resumed: the claim waits it out.
    probe = os.open(claimed.path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(PROBE_GRACE_S / 5, os.close, [probe]).start()
    resumed = claim_run_dir(tmp_path, "exp", "run", reuse=lambda path, state: state == "running")
    assert resumed.path == claimed.path and resumed.reused and resumed.previous_state == "running"
    resumed.release()
