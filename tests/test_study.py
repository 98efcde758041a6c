"""The study as data (`blueberry/study.py`) and `blueberry study`: parts, parallelism, progress, record, resume."""

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from blueberry import study
from blueberry.cli import main
from blueberry.sweep import load_sweep

sys.path.insert(0, str(Path(__file__).parent / "sweep"))
from test_sweep_run import tiny_train, write_sweep  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STARTED = datetime(2026, 12, 2, 5, 34, tzinfo=UTC)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_every_part_is_a_valid_sweep_of_three_seeds(kind, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = study.load_parts([*study.PARTS, study.QUICK], kind)  # raises on any invalid planned trial
    for _, path, _, planned in loaded:
        assert {p["seed"] for p in planned} == {1, 2, 3}, path
        assert len(planned) % 3 == 0
    names = [p.name for p in study.PARTS]
    assert names[0] == "exp1" and len(set(names)) == len(names)
    assert study.QUICK.cpu == study.PARTS[0].cpu  # make run's trials count towards make study


def test_quick_on_cuda_is_the_study_shape_time_boxed(monkeypatch):
    monkeypatch.chdir(REPO)
    full, quick = load_sweep(study.PARTS[0].cuda), load_sweep(study.QUICK.cuda)
    assert full.config["command"] == quick.config["command"]  # same spec file: the study's shape
    assert quick.config["parameters"]["train"]["parameters"]["steps"]["value"] < 375


def test_plan_parts_picks_and_rejects_names():
    assert study.plan_parts(quick=True) == [study.QUICK]
    assert [p.name for p in study.plan_parts(False, ("exp3", "exp1"))] == ["exp1", "exp3"]
    with pytest.raises(ValueError, match="unknown study part.*nope.*exp1, exp2"):
        study.plan_parts(False, ("nope",))
    with pytest.raises(ValueError, match="takes no --only"):  # it ran Experiment 1 whatever --only said
        study.plan_parts(True, ("exp2",))


def test_cpu_parallel_is_one_trial_per_free_core():
    assert study.cpu_parallel(1.9) == 2
    assert study.cpu_parallel(0.8) == 1
    assert study.cpu_parallel(-3.0) == 1
    assert study.cpu_parallel(64) == study.MAX_PARALLEL


def test_study_progress_counts_every_part_and_estimates_from_trials_done():
    now = [0.0]
    progress = study.StudyProgress(total=10, done_before=2, clock=lambda: now[0])
    head = progress.head_for("exp1")
    assert head(0) == "study 2/10 trials, ETA ? · exp1"
    now[0] = 60.0
    assert head(2) == "study 4/10 trials, ETA 03:00 · exp1"  # 30 s per trial, 6 left
    progress.part_finished(2)
    assert progress.head_for("exp2")(1) == "study 5/10 trials, ETA 01:40 · exp2"


def test_bad_part_and_bad_runs_root_exit_2_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(main, ["study", "--only", "exp9", "--runs-root", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown study part(s) exp9" in result.output
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(main, ["study", "--quick", "--runs-root", str(tmp_path / "file")])
    assert result.exit_code == 2 and "--runs-root" in result.output
    assert not (tmp_path / "r").exists()
    monkeypatch.chdir(tmp_path)  # not the repository root: its sweep files are not here
    result = CliRunner().invoke(main, ["study", "--quick", "--dry-run"])
    assert result.exit_code == 2 and ".yaml: not found in" in result.output
    assert "from the repository root" in result.output and "Traceback" not in result.output


def test_a_study_runs_its_parts_records_itself_and_resumes_without_rerunning(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    one = write_sweep(tmp_path, {"seed": {"values": [1, 2]}, "train": tiny_train()}, name="one")
    two = write_sweep(tmp_path, {"seed": {"values": [1]}, "train": tiny_train()}, name="two")
    parts = [study.Part("one", str(one), str(one)), study.Part("two", str(two), str(two))]
    runs_root = str(tmp_path / "runs")
    lines = []
    results = study.run_study(study.load_parts(parts, "cpu"), runs_root, 2, log=lines.append)
    assert [(r.part.name, r.planned, r.finished, r.failed) for r in results] == [("one", 2, 2, []), ("two", 1, 1, [])]
    record = json.loads(study.write_record(results, runs_root, "cpu", "blueberry study", 2, STARTED).read_text())
    assert [p["finished"] for p in record["parts"]] == [2, 1] and record["wall_s"] > 0
    assert record["machine"]["cpu"] and record["code"]["git_sha"]

    again = study.run_study(study.load_parts(parts, "cpu"), runs_root, 2, log=lines.append)
    assert [r.finished for r in again] == [2, 1]
    resumed = [line for line in lines if line.startswith("study part one: ")][-1]
    assert resumed.endswith("(2 trials, 2 already finished)")
    assert len(list(Path(runs_root).glob("one-exp/*/status.json"))) == 2  # nothing ran twice
    second = json.loads(study.write_record(again, runs_root, "cpu", "blueberry study", 2, STARTED).read_text())
    assert second["started"] == record["started"] == "2026-12-02T05:34:00+00:00"
    assert second["wall_s"] >= record["wall_s"]  # the same sweeps: their wall times add up


def test_a_study_record_of_the_wrong_shape_is_rewritten_not_a_crash(tmp_path):
    (tmp_path / "_study").mkdir()
    (tmp_path / "_study" / "cpu.json").write_text('{"parts": 7, "started": 3}')
    part = study.PartResult(study.PARTS[0], "sweeps/cpu/ablation.yaml", "s1", 21, 21, [], 60.0)
    record = json.loads(study.write_record([part], str(tmp_path), "cpu", "blueberry study", 2, STARTED).read_text())
    assert record["started"] == "2026-12-02T05:34:00+00:00" and record["wall_s"] == 60.0


def test_a_record_keeps_the_parts_an_only_invocation_did_not_run_and_sums_the_one_it_did(tmp_path):
    def part(name, wall):
        return study.PartResult(
            next(p for p in study.PARTS if p.name == name), f"{name}.yaml", f"s-{name}", 3, 3, [], wall
        )

    study.write_record(
        [part(n, 600.0) for n in ("exp1", "exp2", "exp3")], str(tmp_path), "cpu", "blueberry study", 2, STARTED
    )
    path = study.write_record([part("exp2", 60.0)], str(tmp_path), "cpu", "blueberry study --only exp2", 2, STARTED)
    record = json.loads(path.read_text())
    assert [(p["name"], p["wall_s"]) for p in record["parts"]] == [("exp1", 600.0), ("exp2", 660.0), ("exp3", 600.0)]
    assert record["wall_s"] == 1860.0 and record["command"] == "blueberry study --only exp2"
    record["parts"] += [{"name": "a-part-since-removed", "wall_s": 100.0}, {"name": "t4-lr", "wall_s": True}, 7]
    path.write_text(json.dumps(record))
    again = json.loads(study.write_record([], str(tmp_path), "cpu", "blueberry study", 2, STARTED).read_text())
    assert [p["name"] for p in again["parts"]] == ["exp1", "exp2", "exp3", "t4-lr"] and again["wall_s"] == 1860.0


def test_a_record_that_cannot_be_written_after_a_whole_study_is_a_warning_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "_study").write_text("")  # a file where the record's folder goes

    def ran(loaded, runs_root, parallel, log, results, part_ended):
        part, path, sweep, planned = loaded[0]
        results.append(study.PartResult(part, path, sweep.sweep_id, len(planned), len(planned), [], 60.0))

    monkeypatch.setattr(study, "run_study", ran)
    result = CliRunner().invoke(main, ["study", "--only", "exp2", "--runs-root", str(tmp_path)])
    assert result.exit_code == 0 and "warning: the study record could not be written" in result.output
    assert "exp2: 18/18 finished in 1.0 min" in result.output


def test_a_record_that_cannot_be_written_leaves_an_interrupted_study_its_exit_130(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "_study").write_text("")  # a file where the record's folder goes

    def interrupted(loaded, runs_root, parallel, log, results, part_ended):
        part, path, sweep, planned = loaded[0]
        results.append(study.PartResult(part, path, sweep.sweep_id, len(planned), 1, [], 60.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    result = CliRunner().invoke(main, ["study", "--only", "exp2", "--runs-root", str(tmp_path)])
    assert result.exit_code == 130 and "warning: the study record could not be written" in result.output


def test_an_interrupted_part_is_in_the_results_with_its_time_so_far(monkeypatch):
    import blueberry.sweep

    class Interrupted:
        def __init__(self, sweep, runs_root, parallel, log):
            self.sweep, self.state = sweep, type("State", (), {"trials": []})()
            self.progress = type("Progress", (), {"outer": None})()

        def run(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(blueberry.sweep, "SweepRunner", Interrupted)
    sweep = type("Sweep", (), {"sweep_id": "s-exp1"})()
    results = []
    with pytest.raises(KeyboardInterrupt):
        study.run_study([(study.PARTS[0], "a.yaml", sweep, [{}, {}])], "runs", 1, log=lambda m: None, results=results)
    assert [(r.part.name, r.sweep_id, r.planned, r.finished) for r in results] == [("exp1", "s-exp1", 2, 0)]
    assert results[0].wall_s >= 0


def test_make_runs_quick_study_counts_towards_the_study_on_a_cpu_only():
    assert study.quick_is_the_studys("cpu") and not study.quick_is_the_studys("cuda")


def test_an_interrupted_study_records_the_time_it_spent_and_exits_130(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)

    def interrupted(loaded, runs_root, parallel, log, results, part_ended):
        part, path, sweep, planned = loaded[0]
        results.append(study.PartResult(part, path, sweep.sweep_id, len(planned), 5, [], 120.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    result = CliRunner().invoke(main, ["study", "--only", "exp2", "--runs-root", str(tmp_path)])
    assert result.exit_code == 130 and "study interrupted; run the same command again to resume" in result.output
    record = json.loads((tmp_path / "_study" / "cpu.json").read_text())
    assert [(p["name"], p["finished"], p["wall_s"]) for p in record["parts"]] == [("exp2", 5, 120.0)]


def test_a_study_killed_after_a_part_keeps_that_parts_time_counted_once(tmp_path, monkeypatch):
    """SIGKILL (a CI timeout, the OOM killer) records nothing on the way out: each part is recorded as it ends."""
    monkeypatch.chdir(REPO)

    def killed_in_the_second_part(loaded, runs_root, parallel, log, results, part_ended):
        for (part, path, sweep, planned), wall in zip(loaded, (300.0, 200.0)):
            results.append(study.PartResult(part, path, sweep.sweep_id, len(planned), len(planned), [], wall))
            part_ended()
        raise SystemExit(137)  # no handler of the study's runs: as a SIGKILL leaves it

    monkeypatch.setattr(study, "run_study", killed_in_the_second_part)
    args = ["study", "--only", "exp2", "--only", "exp3", "--runs-root", str(tmp_path)]
    assert CliRunner().invoke(main, args).exit_code == 137
    record = json.loads((tmp_path / "_study" / "cpu.json").read_text())
    assert [(p["name"], p["wall_s"]) for p in record["parts"]] == [("exp2", 300.0), ("exp3", 200.0)]
    assert record["wall_s"] == 500.0  # each write adds this invocation's time to the record it found, once


def test_only_failed_or_crashed_trials_are_a_parts_failures(monkeypatch):
    """An interrupted trial (running, pending) resumes; one early termination stopped (killed) did as asked."""
    import blueberry.sweep

    trials = [
        type("Trial", (), {"run_id": f"t{i}", "state": state, "reason": None})()
        for i, state in enumerate(["finished", "failed", "crashed", "killed", "running", "pending"])
    ]

    class Ran:
        def __init__(self, sweep, runs_root, parallel, log):
            self.sweep, self.state = sweep, type("State", (), {"trials": trials})()
            self.progress = type("Progress", (), {"outer": None})()

        def run(self):
            pass

    monkeypatch.setattr(blueberry.sweep, "SweepRunner", Ran)
    sweep = type("Sweep", (), {"sweep_id": "s-exp1"})()
    (result,) = study.run_study([(study.PARTS[0], "a.yaml", sweep, [{}] * 6)], "runs", 1, log=lambda m: None)
    assert result.finished == 1 and result.failed == ["t1: failed: None", "t2: crashed: None"]


def test_two_studies_at_once_keep_each_others_parts_in_the_record(tmp_path):
    """`--only exp1` and `--only exp2` in two terminals: each wrote the record it had read at its start, so the
    last to write dropped the other's part."""
    exp1, exp2 = (next(p for p in study.PARTS if p.name == name) for name in ("exp1", "exp2"))
    a = [study.PartResult(exp1, "a.yaml", "s-exp1", 21, 21, [], 600.0)]
    b = [study.PartResult(exp2, "b.yaml", "s-exp2", 18, 18, [], 500.0)]
    study.write_record(b, str(tmp_path), "cpu", "blueberry study --only exp2", 2, STARTED)
    study.write_record(a, str(tmp_path), "cpu", "blueberry study --only exp1", 2, STARTED)
    a[0].wall_s = 650.0  # the first invocation writes again at its end: only its 50 s since count
    path = study.write_record(a, str(tmp_path), "cpu", "blueberry study --only exp1", 2, STARTED)
    record = json.loads(path.read_text())
    assert [(p["name"], p["wall_s"]) for p in record["parts"]] == [("exp1", 650.0), ("exp2", 500.0)]
    assert record["wall_s"] == 1150.0
