"""Experiment 1 read from its sweep file, and the projection's arithmetic."""

from pathlib import Path

import pytest

from blueberry.gpu_check.projection import (
    EXPERIMENT_1,
    REPORT_4090_PRICE,
    compute_flops_per_s,
    project,
    read_experiment,
    run_length,
)
from blueberry.hardware import PRESETS
from blueberry.models import registry
from blueberry.overrides import load_spec


def test_experiment_1_is_the_sweep_grid_times_its_seeds():
    experiment = read_experiment()
    assert [label for label, _ in experiment.presets] == list(registry.PRESETS)  # all seven presets
    assert experiment.seeds == [1, 2, 3]
    assert experiment.base_spec.endswith("experiments/baseline.json")
    for label, overrides in experiment.presets:  # each preset's first run, as the sweep launches it
        spec = load_spec(experiment.base_spec, overrides)
        assert (spec.experiment, spec.model.variant, spec.seed) == ("exp1-ablation", label, 1)
    # 375 optimizer steps × 4 accumulation × 16 windows × 256 tokens
    assert run_length(experiment, experiment.presets[1][1]) == (375 * 4 * 16 * 256, 375 * 4)


def test_a_run_is_what_the_sweep_launches_including_its_command_lines_own_overrides(tmp_path):
    """The projection prices the runs the sweep would run: an override on the sweep's command line reaches them."""
    import yaml

    config = yaml.safe_load(Path(EXPERIMENT_1).read_text())
    command = config["command"]
    config["command"] = [*command[:4], "--train.steps=10", *command[4:]]
    config["command"][3] = str(Path(EXPERIMENT_1).parents[1] / command[3])  # the base spec, from anywhere
    edited = tmp_path / "ablation.yaml"
    edited.write_text(yaml.safe_dump(config))
    experiment = read_experiment(edited)
    assert len(experiment.presets) == 7 and experiment.seeds == [1, 2, 3]
    assert run_length(experiment, experiment.presets[0][1]) == (10 * 4 * 16 * 256, 10 * 4)
    config["parameters"]["model.variant"] = config["parameters"].pop("model")["parameters"]["variant"]  # dotted
    edited.write_text(yaml.safe_dump(config))
    assert [label for label, _ in read_experiment(edited).presets] == [label for label, _ in experiment.presets]


def test_projection_arithmetic_here_and_scaled_by_data_sheet_peaks():
    h100 = next(p for p in PRESETS if p.name == "H100")
    runs = [
        {"label": "a", "tokens": 6_000_000, "tokens_per_s": 600_000.0, "seeds": 3},  # 10 s per run
        {"label": "b", "tokens": 6_000_000, "tokens_per_s": 300_000.0, "seeds": 3},  # 20 s per run
    ]
    result = project(runs, startup_s=5.0, here=h100, here_precision="bf16", price_here=3.0)
    assert result["runs"] == 6 and result["train_s_here"] == pytest.approx(90.0)
    here, t4, rtx4090 = result["targets"]
    assert here["gpu"] == "H100" and here["wall_s"] == pytest.approx(90.0 + 6 * 5.0)
    assert here["cost_usd"] == pytest.approx(120.0 / 3600 * 3.0)
    # T4: fp16 peak 65 TFLOP/s (it has no bf16); the start-up does not scale
    assert t4["precision"] == "fp16" and t4["wall_s"] == pytest.approx(90.0 * 989.4 / 65.0 + 30.0)
    assert t4["cost_usd"] == pytest.approx(t4["wall_s"] / 3600 * 0.35)
    assert rtx4090["wall_s"] == pytest.approx(90.0 * 989.4 / 165.2 + 30.0)
    assert rtx4090["usd_per_hour"] == REPORT_4090_PRICE == 0.18
    assert "data-sheet" in rtx4090["basis"]
    runs[0]["compile_s"] = 20.0  # a compiled run pays its compile time, on every GPU (host work)
    again = project(runs, startup_s=5.0, here=h100, here_precision="bf16", price_here=3.0)["targets"]
    assert [t["wall_s"] - old["wall_s"] for t, old in zip(again, (here, t4, rtx4090))] == pytest.approx([60.0] * 3)


def test_projection_without_a_peak_or_price_stays_here_and_costs_nothing():
    unknown = PRESETS[0].__class__("Some GPU", (), "fp32", {}, None, 64)
    result = project([{"label": "a", "tokens": 10, "tokens_per_s": 1.0, "seeds": 1}], 0.0, unknown, "bf16", None)
    assert [row["gpu"] for row in result["targets"]] == ["Some GPU"]
    assert result["targets"][0]["cost_usd"] is None and result["targets"][0]["wall_s"] == 10.0


def _step(tokens: int, micro_steps: int, overhead_s=0.030, flops_per_s=500e12, flops_per_token=2e8) -> dict:
    """`measure`'s figures for a step of `micro_steps` micro-steps: a host overhead each, plus the FLOPs."""
    step_s = micro_steps * overhead_s + tokens * flops_per_token / flops_per_s
    return {"tokens_per_step": tokens, "flops_per_token": flops_per_token, "step_s": step_s}


def test_a_step_splits_into_host_overhead_and_compute_from_two_micro_batch_sizes():
    small = _step(4096, 1)  # the study's micro-batch: 30 ms of overhead, 1.6 ms of compute
    assert compute_flops_per_s(small, _step(16384, 1), 1) == pytest.approx(500e12)  # one micro-step of 64
    assert compute_flops_per_s(small, _step(16384, 2), 2) == pytest.approx(500e12)  # two micro-steps of 32
    assert compute_flops_per_s(small, _step(8192, 2), 2) is None  # the same micro-batch twice: no second size
    assert compute_flops_per_s(small, {**_step(16384, 1), "step_s": small["step_s"]}, 1) is None  # no slower


def test_on_another_gpu_only_a_steps_compute_scales_and_the_host_overhead_stays():
    h100 = next(p for p in PRESETS if p.name == "H100")
    runs = [{"label": "a", "tokens": 6_000_000, "tokens_per_s": 600_000.0, "seeds": 1, "compute_share": 0.1}]
    here, t4, rtx4090 = project(runs, startup_s=5.0, here=h100, here_precision="bf16", price_here=3.0)["targets"]
    assert here["wall_s"] == pytest.approx(10.0 + 5.0)  # here: as measured
    assert t4["wall_s"] == pytest.approx(10.0 * (0.9 + 0.1 * 989.4 / 65.0) + 5.0)
    assert rtx4090["wall_s"] == pytest.approx(10.0 * (0.9 + 0.1 * 989.4 / 165.2) + 5.0)
    assert "compute (10%–10% of a step here)" in t4["basis"] and "host overhead kept" in t4["basis"]
