import pytest
import torch

from blueberry.bench.measure import ListTracker
from blueberry.train import metrics as metrics_module
from blueberry.train.metrics import MetricsProcessor


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_window_excludes_paused_time_and_rows_reach_the_tracker(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    tracker = ListTracker()
    processor = MetricsProcessor(tracker, flops_per_token=1e6, peak=1e12)
    processor.begin(torch.device("cpu"), tokens_per_step=1000)
    for _ in range(4):
        clock.now += 1.0
        processor.step_done()
    with processor.paused():  # an evaluation: its 10 s are not training time
        clock.now += 10.0
    row = processor.log_train({"train/loss": 3.0, "train/lr_adamw": 0.1}, step=4, now=processor.sync())
    assert row["perf/tokens_per_s"] == pytest.approx(1000.0) and row["perf/step_time_s"] == pytest.approx(1.0)
    assert row["perf/tflops"] == pytest.approx(1e-3) and row["perf/mfu"] == pytest.approx(1e-3)
    assert tracker.rows == [{"step": 4, **row}]
    summary = {"perf/tokens_per_s": 1000.0}
    processor.close(summary)
    assert summary["cost/usd"] is None and summary["cost/device_hours"] > 0  # no price on this machine


def test_a_resumed_run_costs_its_earlier_attempts_wall_time_too(monkeypatch):
    # 2 devices at $3.60/h: 1,000 s before the checkpoint it resumed from, then 800 s in this attempt.
    monkeypatch.setattr(metrics_module.time, "time", lambda: 10_800.0)
    processor = MetricsProcessor(ListTracker(), price_per_hour=3.6, world_size=2, started=10_000.0)
    processor.begin(torch.device("cpu"), tokens_per_step=1000, elapsed_before=900.0, wall_before=1000.0)
    assert processor.wall_s() == 1800.0  # what the next checkpoint stores as wall_s
    summary = {}
    processor.close(summary)
    assert summary["cost/device_hours"] == pytest.approx(1.0) and summary["cost/usd"] == pytest.approx(3.6)


def test_mfu_of_a_distributed_run_is_over_every_ranks_peak(monkeypatch):
    """The trainer counts every rank's tokens; the plan's peak is one device's: MFU divides by world × peak."""
    clock = Clock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    processor = MetricsProcessor(ListTracker(), flops_per_token=1e6, peak=1e12, world_size=4)
    processor.begin(torch.device("cpu"), tokens_per_step=1000)  # all 4 ranks' tokens
    clock.now += 1.0
    processor.step_done()
    row = processor.log_train({"train/loss": 3.0}, step=1, now=processor.sync())
    assert row["perf/tflops"] == pytest.approx(1e-3) and row["perf/mfu"] == pytest.approx(1e-3 / 4)


def test_peak_gpu_memory_counts_from_the_start_of_training(monkeypatch):
    """The build's batch-size probe can peak above training: the logged peak is training's (CUDA faked)."""
    allocator = {"peak": 9000 * 2**20}  # the probe's
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    processor = MetricsProcessor(ListTracker())
    processor.begin(torch.device("cuda"), tokens_per_step=1000)
    allocator["peak"] = 300 * 2**20  # training's
    processor.step_done()
    row = processor.log_train({"train/loss": 3.0}, step=1, now=processor.sync())
    assert row["perf/peak_memory_mb"] == 300


class Monitor:
    """A GpuMonitor that has measured `wh` so far."""

    def __init__(self, wh):
        self.wh = wh

    def energy_wh(self):
        return self.wh

    def latest(self):
        return {}

    def stop(self):
        return {"gpu/energy_wh": self.wh}


def test_a_resumed_runs_energy_is_every_attempts_as_its_cost_is():
    """The cost counts the earlier attempts' wall time (kept in the checkpoint); the energy did not: a run killed
    and resumed reported only its last attempt's."""
    from test_trainer import tiny_model

    from blueberry.train.trainer import Trainer

    spec, data, model = tiny_model("--model.variant=mlp", "--train.steps=1")
    first = MetricsProcessor(ListTracker(), monitor=Monitor(2.0))
    trainer = Trainer(spec, model, data, first, torch.device("cpu"), "fp32")
    trainer.train()
    state = {**trainer.state_dict(), "step": 1}
    assert state["energy_wh"] == 2.0  # what the checkpoint keeps
    second = MetricsProcessor(ListTracker(), monitor=Monitor(0.5))
    Trainer(spec, model, data, second, torch.device("cpu"), "fp32").train(resume=state)
    summary = {}
    second.close(summary)
    assert summary["gpu/energy_wh"] == 2.5
    none = MetricsProcessor(ListTracker())  # no GPU read: no energy, whatever the attempts
    none.begin(torch.device("cpu"), 1)
    summary = {}
    none.close(summary)
    assert "gpu/energy_wh" not in summary and none.energy_wh() is None
