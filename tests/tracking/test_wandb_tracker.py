import os
import re
import time
from pathlib import Path

import pytest
import torch
from offline_tracker import fresh_run_dir, offline_tracker
from wandb.proto import wandb_internal_pb2

from blueberry.tracking import RunRecord, Trackers, new_run_id, resolve_mode, sweep_tag
from blueberry.tracking.wandb_log import _payloads, read_wandb_log
from blueberry.tracking.wandb_tracker import wandb_segments


def test_mode_is_offline_without_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto")[0] == "offline"
    mode, why = resolve_mode("online")
    assert mode == "offline" and "no API key" in why
    assert resolve_mode("disabled")[0] == "disabled"


def test_mode_online_needs_key_and_respects_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto")[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto")[0] == "offline"
    assert resolve_mode("online")[0] == "online"


def test_offline_run_holds_what_was_logged(tmp_path):
    run_dir = fresh_run_dir(tmp_path, "exp", "r1")
    tracker = offline_tracker(run_dir, run_id="r1", tags=["moe", "t"], config={"model": {"n_experts": 4}, "seed": 1})
    trackers = Trackers(RunRecord(run_dir, {}), tracker)
    for step in (1, 2, 3):
        trackers.log({"train/loss": 5.0 - step, "trainer/tokens": 100 * step}, step)
    trackers.log({"val/loss": 2.5}, 3)
    trackers.summary({"final/val_loss": 2.5})
    trackers.finish("finished")

    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    log = read_wandb_log(offline[0])
    assert (log.run_id, log.name, log.group, log.job_type) == ("r1", "exp-moe-s1", "exp", "train")
    assert set(log.tags) == {"moe", "t"}
    train_rows = [row for row in log.history if "train/loss" in row]
    assert [row["train/loss"] for row in train_rows] == [4.0, 3.0, 2.0]
    assert [row["trainer/step"] for row in train_rows] == [1, 2, 3]
    assert log.summary["final/val_loss"] == 2.5
    assert log.summary["val/loss"]["min"] == 2.5  # define_metric(summary="min,last")
    assert log.exit_code == 0


def test_run_ids_are_fresh_and_sweep_tags_fit_wandb_limit():
    ids = {new_run_id("exp-moe-lr0.01-s1") for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"exp-moe-lr0\.01-s1-[a-z0-9]{8}", i) for i in ids)
    assert len(sweep_tag("x" * 100)) == 64 and sweep_tag("abl").startswith("sweep:abl")


def test_checkpoints_get_best_alias_and_summary_has_no_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # W&B reads ./wandb/settings, where a developer's `wandb offline` may have left one
    run_dir = fresh_run_dir(tmp_path, "exp", "r1")
    tracker = offline_tracker(run_dir, tags=["moe", "sweep:" + "y" * 80])
    assert tracker.run.settings.x_disable_stats is False  # W&B system metrics on by default
    checkpoint = run_dir / "step.pt"
    checkpoint.write_bytes(b"weights")
    for step, val_loss in ((10, 3.0), (20, 2.0), (30, 2.5)):
        tracker.log({"val/loss": val_loss}, step)
        tracker.log_checkpoint(checkpoint, step)
    tracker.log_checkpoint(checkpoint, 35)  # between evaluations: step 30's loss is not this checkpoint's
    tracker.log_weights({"w": torch.zeros(2)}, {"step": 30, "val/loss": 2.5})
    tracker.summary({"cost/usd": None, "params/total": 7, "val/loss": 2.5})
    tracker.finish("finished")

    log = read_wandb_log(tracker.offline_dir)
    assert [tag for tag in log.tags if tag.startswith("sweep:")] == ["sweep:" + "y" * 58]
    checkpoints = [a for a in log.artifacts if a["name"].startswith("checkpoint-")]
    assert [set(a["aliases"]) for a in checkpoints] == [
        {"latest", "step-10", "best"},
        {"latest", "step-20", "best"},
        {"latest", "step-30"},  # worse than step 20: `best` stays there
        {"latest", "step-35"},
    ]
    assert checkpoints[1]["metadata"] == {"step": 20, "val/loss": 2.0}
    assert checkpoints[3]["metadata"] == {"step": 35}
    (model,) = [a for a in log.artifacts if a["name"] == f"model-{tracker.run_id}"]
    assert model["type"] == "model" and model["metadata"]["step"] == 30
    assert "cost/usd" not in log.summary and log.summary["params/total"] == 7
    assert "status/reason" not in log.summary  # a value the run does not have
    assert log.summary["val/loss"] == {"min": 2.0, "last": 2.5}  # W&B's own min/last, not overwritten
    assert log.summary["final/val_loss"] == 2.5  # and a number W&B's panels can plot


def test_a_finished_run_clears_the_reason_an_earlier_attempt_left_in_its_summary(tmp_path):
    # Online, a resumed run starts from the server's summary: the interrupted attempt's reason is in it.
    first = offline_tracker(fresh_run_dir(tmp_path, "exp", "r1"), run_id="r1")
    first.finish("interrupted", "SIGTERM at step 4, checkpoint at step 4")
    time.sleep(1.1)  # W&B names a segment's folder by its start second
    second = offline_tracker(tmp_path / "exp" / "r1", run_id="r1", resume="allow")  # offline: its summary is empty
    second.finish("finished")
    segments = sorted((tmp_path / "exp" / "r1" / "wandb").glob("offline-run-*-r1"))
    assert read_wandb_log(segments[0]).summary["status/reason"].startswith("SIGTERM")
    removed = []  # `wandb sync` replays the second segment's summary records over the first's: it must remove it
    for payload in _payloads(next(segments[1].glob("run-*.wandb")).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "summary":
            removed += ["/".join(item.nested_key) or item.key for item in record.summary.remove]
    assert removed == ["status/reason"] and "status/reason" not in read_wandb_log(segments[1]).summary


def test_the_segments_of_a_run_begun_online_and_resumed_offline_are_all_found_oldest_first(tmp_path):
    # What an online attempt sent is in its own log, run-<time>-<id>: a resume offline must not log it again.
    made = []
    for folder in ("run-20261205_100000-r1", "offline-run-20261205_090000-r1", "offline-run-20261205_110000-r1"):
        (tmp_path / "wandb" / folder).mkdir(parents=True)
        made.append(tmp_path / "wandb" / folder / "run-r1.wandb")
        made[-1].write_bytes(b"")
    (tmp_path / "wandb" / "run-20261205_100000-r2").mkdir()  # another run's
    (tmp_path / "wandb" / "run-20261205_100000-r2" / "run-r2.wandb").write_bytes(b"")
    assert wandb_segments([tmp_path], "r1") == [made[1], made[0], made[2]]


def test_system_metrics_can_be_turned_off(tmp_path):
    tracker = offline_tracker(fresh_run_dir(tmp_path, "exp", "r1"), system_metrics=False)
    assert tracker.run.settings.x_disable_stats is True
    tracker.finish("finished")


@pytest.mark.parametrize(("spec_says", "disabled"), [(None, True), (True, False)])
def test_system_metrics_left_unset_follow_wandbs_own_setting(tmp_path, monkeypatch, spec_says, disabled):
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    tracker = offline_tracker(fresh_run_dir(tmp_path, "exp", "r1"), system_metrics=spec_says)
    assert tracker.run.settings.x_disable_stats is disabled  # what the spec sets wins over W&B's variable
    tracker.finish("finished")


@pytest.mark.parametrize(
    ("env", "settings_file", "expected"),
    [
        ({}, "", ("off", False)),  # ours: no console capture, no code saved
        ({"WANDB_CONSOLE": "wrap", "WANDB_SAVE_CODE": "true"}, "", ("wrap", True)),
        ({}, "console = wrap\nsave_code = true\n", ("wrap", True)),  # W&B's global settings file
    ],
)
def test_console_capture_and_code_saving_follow_wandbs_settings(tmp_path, monkeypatch, env, settings_file, expected):
    """A W&B setting the spec has no field for follows W&B's variables and settings files, as README promises."""
    monkeypatch.chdir(tmp_path)  # no developer's ./wandb/settings
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    Path(os.environ["WANDB_CONFIG_DIR"], "settings").write_text(f"[default]\n{settings_file}")
    tracker = offline_tracker(fresh_run_dir(tmp_path, "exp", "r1"))
    try:
        assert (tracker.run.settings.console, tracker.run.settings.save_code) == expected
        print("captured when the user asks for it")
    finally:
        tracker.finish("finished")
    console = ""  # what W&B's console capture sent ("wrap": its output_raw records)
    for payload in _payloads(next(Path(tracker.offline_dir).glob("run-*.wandb")).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        console += record.output_raw.line if record.WhichOneof("record_type") == "output_raw" else ""
    assert ("captured when the user asks for it" in console) is (expected[0] == "wrap")


def test_online_prints_the_run_and_sweep_urls_after_init_and_at_the_end(tmp_path, monkeypatch):
    """No network here: wandb.init is replaced by a run that has W&B's URLs, to see what the user is shown."""
    import wandb

    class OnlineRun:
        url = "https://wandb.ai/team/blueberry/runs/abc"
        sweep_url = "https://wandb.ai/team/blueberry/sweeps/s1"
        dir = str(tmp_path / "wandb" / "run-abc" / "files")
        summary: dict = {}

        def define_metric(self, *args, **kwargs):
            pass

        def finish(self, exit_code):
            self.exit_code = exit_code

    seen, run = [], OnlineRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.append(kwargs) or run)
    monkeypatch.setattr(wandb, "teardown", lambda: None)
    said = []
    tracker = offline_tracker(tmp_path, mode="online", log=said.append)
    tracker.finish("finished")
    assert seen[0]["mode"] == "online" and seen[0]["settings"].quiet and not seen[0]["settings"].silent
    assert said == [
        "W&B run: https://wandb.ai/team/blueberry/runs/abc",
        "W&B sweep: https://wandb.ai/team/blueberry/sweeps/s1",
        "W&B run finished: https://wandb.ai/team/blueberry/runs/abc",
    ]
    assert run.exit_code == 0


def test_a_resumed_runs_best_so_far_summaries_cover_every_attempt(tmp_path):
    """W&B's define_metric min/max are over the rows logged in its process: after a resume only the last
    attempt's, and `wandb sync` keeps the last segment's summary. The runner sets them from the whole record."""
    import time

    first = offline_tracker(tmp_path, run_id="r1")
    first.log({"val/loss": 2.0, "val/accuracy": 0.5}, step=10)
    first.finish("interrupted", "SIGTERM at step 10")
    time.sleep(1.1)  # W&B names a segment's folder by its start second
    second = offline_tracker(tmp_path, run_id="r1", resume="allow")
    second.log({"val/loss": 2.5, "val/accuracy": 0.4}, step=20)
    rows = [{"step": 10, "val/loss": 2.0, "val/accuracy": 0.5}, {"step": 20, "val/loss": 2.5, "val/accuracy": 0.4}]
    second.summarise_history(rows)
    second.finish("finished")
    segments = sorted((tmp_path / "wandb").glob("offline-run-*-r1"))
    summary = read_wandb_log(segments[-1]).summary
    assert summary["val/loss"] == {"min": 2.0, "last": 2.5} and summary["val/accuracy"] == {"max": 0.5, "last": 0.4}
