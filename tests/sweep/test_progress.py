"""The sweep's live view reads the trials' run records: step, loss, tokens/s, ETAs; bad records never crash it."""

import io
import json

from blueberry.sweep import progress
from blueberry.sweep.progress import SweepProgress, last_row


def trial_dir(tmp_path, name, steps, rows, torn=""):
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps({"spec": {"train": {"steps": steps}}}))
    lines = [json.dumps(r) for r in rows]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + torn)
    return run_dir


def test_last_row_skips_torn_lines_non_objects_and_eval_rows(tmp_path):
    train = {"step": 20, "time": 10.0, "train/loss": 5.5, "perf/tokens_per_s": 8000.0}
    run_dir = trial_dir(tmp_path, "a", 100, [train, {"step": 20, "val/loss": 5.6}, [1, 2]], torn='{"step": 30, "tr')
    assert last_row(run_dir / "metrics.jsonl") == train
    assert last_row(tmp_path / "missing.jsonl") is None


def test_log_lines_give_trial_step_loss_speed_and_etas(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    rows = [{"step": 25, "time": 50.0, "train/loss": 6.25, "perf/tokens_per_s": 4321.0}]
    run_dir = trial_dir(tmp_path, "sweep-t2", 100, rows)
    lines = []
    view = SweepProgress("ablation", total=4, parallel=1, stream=io.StringIO(), log=lines.append)
    view.update([(2, "sweep-t2", run_dir)], done=[180.0])
    (line,) = lines
    # trial 2 at step 25 of 100 after 50 s: 150 s left; then trials 3 and 4 at 180 s each (the finished one's time)
    assert "ablation: 1/4 done" in line
    assert "trial 2/4 step 25/100 loss 6.250 4,321 tok/s ETA 02:30" in line
    assert "sweep ETA 08:30" in line
    view.update([(2, "sweep-t2", run_dir)], done=[180.0])
    assert len(lines) == 1  # in a log file: a line every LOG_EVERY_S, not every poll


def test_stopped_and_failed_trials_are_done_not_still_to_run(tmp_path, monkeypatch):
    """A sweep of 10: 3 finished (180 s each), 5 ended otherwise (early-terminated, failed), 1 running with 150 s to
    go: one trial waits, not six; the study's head counts all 8 ended trials as done."""
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    rows = [{"step": 25, "time": 50.0, "train/loss": 6.25, "perf/tokens_per_s": 4321.0}]
    run_dir = trial_dir(tmp_path, "sweep-t9", 100, rows)
    lines, heads = [], []
    view = SweepProgress("ablation", total=10, parallel=1, stream=io.StringIO(), log=lines.append)
    view.outer = heads.append
    view.update([(9, "sweep-t9", run_dir)], done=[180.0, 180.0], ended_before=2, stopped=4)
    (line,) = lines
    assert "ablation: 8/10 done" in line and "sweep ETA 05:30" in line  # 150 s + the one left at 180 s
    assert heads == [6]  # ended since this controller started: 2 finished, 4 stopped


def test_a_trial_without_a_record_yet_still_shows(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    lines = []
    view = SweepProgress("lr", total=None, parallel=2, stream=io.StringIO(), log=lines.append)
    view.update([(1, "lr-t1", None)], done=[])
    assert lines == ["lr: 0/? done | trial 1/? step 0/? ETA ? | sweep ETA ?"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_one_line_is_redrawn_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    rows = [{"step": 10, "time": 5.0, "train/loss": 7.0, "perf/tokens_per_s": 1000.0}]
    run_dir = trial_dir(tmp_path, "t1", 50, rows)
    screen = FakeTerminal()
    lines = []
    view = SweepProgress("s", total=2, parallel=1, stream=screen, log=lines.append)
    view.update([(1, "t1", run_dir)], done=[])
    view.update([(1, "t1", run_dir)], done=[])
    view.write("  t1: finished")
    view.close()
    assert lines == []  # nothing went to the log: all of it is on the terminal
    text = screen.getvalue()
    assert "trial 1/2 step 10/50 loss 7.000" in text and "\r" in text and "  t1: finished\n" in text
