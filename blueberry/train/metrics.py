"""The metrics processor (after torchtitan's components/metrics.py): one owner of every throughput figure.

Tokens/s, step time, peak memory, TFLOP/s and MFU, the GPU sampler's readings and the run's cost are derived
here; the trainer hands it its own metrics (loss, LR, gradient norm) on log steps, and trackers receive the
finished rows. Time spent in evaluation and checkpointing is kept out of the throughput window.
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Any

import torch

from blueberry.hardware import run_cost


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since training began, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsProcessor:
    """Turns the trainer's log-step metrics into rows for `tracker` (a Tracker: log, summary, finish).

    flops_per_token and peak (one device's) give perf/tflops and perf/mfu, over the world_size devices whose
    tokens the trainer counts; monitor (a GpuMonitor) the gpu/* readings and the energy; price_per_hour and
    world_size the cost/* summary keys, over the wall time since `started` (plus earlier attempts', `begin`).
    """

    def __init__(
        self,
        tracker,
        flops_per_token: float | None = None,
        peak: float | None = None,
        monitor=None,
        *,
        price_per_hour: float | None = None,
        world_size: int = 1,
        started: float | None = None,
    ):
        self.tracker, self.flops_per_token, self.peak, self.monitor = tracker, flops_per_token, peak, monitor
        self.price_per_hour, self.world_size = price_per_hour, world_size
        self.started_wall = time.time() if started is None else started
        self.device = torch.device("cpu")
        self.tokens_per_step = 0
        self.wall_before = 0.0
        self.energy_before: float | None = None

    # --- the training window ---------------------------------------------------------------------------

    def begin(
        self,
        device: torch.device,
        tokens_per_step: int,
        elapsed_before: float = 0.0,
        wall_before: float = 0.0,
        energy_before: float | None = None,
    ) -> None:
        """Start timing: `tokens_per_step` over all ranks; `elapsed_before` the training time, `wall_before` the
        wall time (set-up included: what the cost is paid for) and `energy_before` the GPUs' energy (Wh) of earlier
        attempts, up to their checkpoint."""
        self.device, self.tokens_per_step = device, tokens_per_step
        self.wall_before, self.energy_before = wall_before, energy_before
        if device.type == "cuda":  # peak memory from here on: training and its evaluations, not the build's probe
            torch.cuda.reset_peak_memory_stats(device)
        self.window_start = time.perf_counter()
        self.started = self.window_start - elapsed_before
        self.steps_timed = 0

    def step_done(self) -> None:
        self.steps_timed += 1  # since window_start: after a resume, fewer than the log window holds

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) is kept out of the throughput figure."""
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - paused_at

    def wall_s(self) -> float:
        """The run's wall time so far: this attempt's since it started, plus earlier attempts' (begin)."""
        return time.time() - self.started_wall + self.wall_before

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def sync(self) -> float:
        """Wait for the device and read the clock: the end of the window being logged."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def log_train(self, metrics: dict[str, Any], step: int, now: float) -> dict[str, Any]:
        """Log the trainer's `metrics` with the window's throughput figures; start the next window."""
        seconds = now - self.window_start
        row = {
            **metrics,
            "perf/tokens_per_s": self.steps_timed * self.tokens_per_step / seconds,
            "perf/step_time_s": seconds / self.steps_timed,
            "perf/peak_memory_mb": peak_memory_mb(self.device),
            "perf/elapsed_s": now - self.started,
        }
        if "train/lr_adamw" in row:  # after the perf keys, where the row has always had it
            row["train/lr_adamw"] = row.pop("train/lr_adamw")
        row = self.log(row, step)
        self.steps_timed = 0
        self.window_start = time.perf_counter()
        return row

    # --- the Tracker interface -------------------------------------------------------------------------

    def _derived(self, values: dict[str, Any]) -> dict[str, Any]:
        if self.flops_per_token is None:
            return {}
        achieved = self.flops_per_token * values["perf/tokens_per_s"]
        out = {"perf/tflops": achieved / 1e12}
        if self.peak:
            out["perf/mfu"] = achieved / (self.peak * self.world_size)  # tokens/s are every rank's
        return out

    def log(self, metrics: dict[str, Any], step: int) -> dict[str, Any]:
        """A row that carries perf/tokens_per_s gains perf/tflops, perf/mfu and the latest GPU readings."""
        if "perf/tokens_per_s" in metrics:
            metrics = {**metrics, **self._derived(metrics)}
            if self.monitor is not None:
                metrics.update(self.monitor.latest())
        self.tracker.log(metrics, step)
        return metrics

    def summary(self, values: dict[str, Any]) -> None:
        """Adds the perf figures to `values` in place, so the caller's summary matches the recorded one."""
        if "perf/tokens_per_s" in values:  # the trainer's summary holds the last log row's throughput
            values.update(self._derived(values))
            if self.flops_per_token is not None:
                values["perf/flops_per_token"] = self.flops_per_token
        self.tracker.summary(values)

    def energy_wh(self) -> float | None:
        """The GPUs' energy so far (a checkpoint keeps it): this attempt's plus earlier attempts' (begin)."""
        return _sum_known(self.monitor.energy_wh() if self.monitor is not None else None, self.energy_before)

    def close(self, summary: dict[str, Any]) -> None:
        """Stop the GPU sampler and add the run's energy (every attempt's, as its cost) and cost to `summary`."""
        stopped = self.monitor.stop() if self.monitor is not None else {}
        energy = _sum_known(stopped.get("gpu/energy_wh"), self.energy_before)
        summary.update({} if energy is None else {"gpu/energy_wh": energy})
        summary.update(run_cost(self.price_per_hour, self.wall_s(), self.world_size))

    def finish(self, state: str, reason: str | None = None, exit_code: int = 0) -> None:
        self.tracker.finish(state, reason, exit_code)


def _sum_known(*values: float | None) -> float | None:
    """The sum of the values that are known; None if none is."""
    known = [value for value in values if value is not None]
    return sum(known) if known else None
