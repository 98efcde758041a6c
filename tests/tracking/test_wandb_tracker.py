from blueberry.tracking import RunRecord, Trackers, WandbTracker, allocate_run_dir, resolve_mode
from blueberry.tracking.wandb_log import read_wandb_log


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
    run_dir = allocate_run_dir(tmp_path, "exp", "r1")
    tracker = WandbTracker(
        run_dir,
        mode="offline",
        project="blueberry",
        entity=None,
        group="exp",
        job_type="train",
        name="exp-moe-s1",
        run_id="r1",
        tags=["moe", "t"],
        notes=None,
        config={"model": {"n_experts": 4}, "seed": 1},
    )
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
