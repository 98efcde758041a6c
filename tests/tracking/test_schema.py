import json

from blueberry.report.records import read_local_run
from blueberry.report.synthetic import write_run
from blueberry.tracking.schema import HEADER_KEYS, header_from_wandb_config, keep_metric, wandb_config


def test_a_new_metric_namespace_reaches_the_report_history(tmp_path):
    run_dir = write_run(tmp_path, "exp", steps=20, eval_every=10, log_every=10)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        row = {"step": 20, "time": 9.0, "balance/layer0/load_entropy": 1.25, "gpu/util_pct": 80.0}
        handle.write(json.dumps(row) + "\n")
    run = read_local_run(run_dir)
    assert run.history.series("balance/layer0/load_entropy")[1].tolist() == [1.25]
    assert run.history.series("gpu/util_pct")[1].tolist() == [80.0]
    assert "moe/layer0/load_max" in run.history.columns and "moe/layer0/balance_loss" in run.history.columns
    assert not any(c.startswith("moe/layer0/load_e") for c in run.history.columns)  # per-expert loads stay out


def test_keep_metric_drops_only_per_expert_loads():
    assert keep_metric("newspace/anything") and keep_metric("moe/layer3/load_max")
    assert not keep_metric("moe/layer3/load_e7")


def test_wandb_config_round_trips_the_header_keys_the_report_reads(tmp_path):
    header = json.loads((write_run(tmp_path, "exp") / "spec.json").read_text())
    config = wandb_config(header)
    assert config["variant"] == "baseline" and config["model"] == header["spec"]["model"]
    back = header_from_wandb_config(json.loads(json.dumps(config)), header["created_at"])  # as W&B stores it
    assert back["params"] == {k: header["params"][k] for k in ("total", "active")}
    assert back["data"]["fingerprint"] == header["data"]["fingerprint"]
    assert set(back) <= set(HEADER_KEYS)
    # What the report's integrity section reads: the device (its cost), the causality probe, the leakage audit.
    assert back["hardware"] == header["hardware"] and back["causality"] == header["causality"]
    leakage = header["data"]["leakage"]
    assert back["data"]["leakage"] == {k: leakage[k] for k in ("val_windows_with_train_ngram", "ngram")}


def test_a_blueberry_sweep_trial_names_its_sweep_in_the_wandb_config(tmp_path):
    """Synced to W&B, a `blueberry sweep` trial belongs to no W&B sweep: top-level keys name it (W&B's run table
    filters and groups on them)."""
    header = json.loads((write_run(tmp_path, "exp") / "spec.json").read_text())
    assert "sweep_id" not in wandb_config(header, name_the_sweep=True)
    header["sweep"] = {"id": "lr-grid-1a2b3c4d", "name": "lr-grid"}
    config = wandb_config(header, name_the_sweep=True)
    assert (config["sweep_id"], config["sweep_name"]) == ("lr-grid-1a2b3c4d", "lr-grid")
    assert "sweep_id" not in wandb_config(header)  # under `wandb agent`: W&B shows the run's own sweep
