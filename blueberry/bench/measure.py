"""Measurement primitives for `make bench`: step time through the real trainer, peak memory, tracking cost,
and the latency from `blueberry run` to the first finished step.

Throughput runs the real `train()` loop on synthetic tokens (random windows: the hot path does not care
what the tokens are, and no tokenizer has to be trained). Every figure is a median over repeats after warmup.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from blueberry.allocator import release_freed_memory
from blueberry.data.windows import TrainSampler
from blueberry.hardware import resolve_device, resolve_precision
from blueberry.models import build_model
from blueberry.plan import build
from blueberry.spec import RunSpec


class SyntheticData:
    """Uniform random tokens with the interface `train()` uses (`train_sampler`, `val_windows`, `vocab_size`)."""

    def __init__(self, vocab_size: int, seq_len: int, n_tokens: int = 200_000, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.tokens = torch.randint(vocab_size, (n_tokens,), generator=generator)

    def train_sampler(self, batch_size: int, seed: int | None = None) -> TrainSampler:
        return TrainSampler(self.tokens, self.seq_len, batch_size, seed or 0)

    def val_windows(self) -> torch.Tensor:
        return self.tokens[: self.seq_len + 1][None]  # one window: the bench times training, not evaluation


class ListTracker:
    """Keeps the logged rows; optionally times how long an inner tracker spends in its calls."""

    def __init__(self, inner=None):
        self.rows: list[dict] = []
        self.inner = inner
        self.seconds = 0.0

    def log(self, metrics, step):
        self.rows.append({"step": step, **metrics})
        if self.inner is not None:
            start = time.perf_counter()
            self.inner.log(metrics, step)
            self.seconds += time.perf_counter() - start

    def summary(self, values):
        if self.inner is not None:
            self.inner.summary(values)

    def finish(self, state, reason=None, exit_code=0):
        if self.inner is not None:
            self.inner.finish(state, reason, exit_code)


def reset_peak_rss() -> None:
    """Return freed memory to the OS and reset the kernel's peak-RSS mark (Linux), so each case gets its own peak."""
    gc.collect()
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench_spec(spec: RunSpec, steps: int, log_every: int = 1) -> RunSpec:
    """The spec, cut to `steps` optimizer steps with no evaluation until the last step and no progress bar."""
    train = {**spec.train.model_dump(), "steps": steps, "log_every": log_every, "eval_every": steps}
    train["progress"] = False
    return RunSpec.model_validate({**spec.to_json_dict(), "train": train})


def measure_throughput(spec: RunSpec, warmup: int = 2, repeats: int = 5, callbacks=()) -> dict:
    """Median step time of `repeats` steps after `warmup` ones, through the real trainer (its `callbacks` after
    each step), plus derived figures."""
    from blueberry.train import train
    from blueberry.train.device import prepare_process

    spec = bench_spec(spec, warmup + repeats)
    device = resolve_device(spec.train.device)
    prepare_process(device)  # as a run does
    data = SyntheticData(spec.data.vocab_size, spec.data.seq_len)
    # the run's build stage, less the causality check and the peak FLOP/s (the bench measures its own ceiling)
    built = build(spec, device, data.vocab_size, check_causal=False, peak=False)
    precision, flops_total = built.precision, built.plan.flops_per_token
    tracker = ListTracker()
    reset_peak_rss()
    start = time.perf_counter()
    train(built.spec, built.model, data, tracker, built.device, precision, callbacks=callbacks)
    wall = time.perf_counter() - start
    step_times = [row["perf/step_time_s"] for row in tracker.rows if "perf/step_time_s" in row]
    step_s = statistics.median(step_times[warmup:])
    run = built.spec  # as planned: a batch_size "auto" resolved to a number
    tokens_per_step = run.train.batch_size * run.train.grad_accum * run.data.seq_len
    return {
        "precision": precision,
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "timed_step_s": step_times[warmup:],
        "first_step_s": step_times[0],
        "tokens_per_s": tokens_per_step / step_s,
        "flops_per_token": flops_total,
        "tflops": flops_total * tokens_per_step / step_s / 1e12,
        "peak_rss_mb": peak_rss_mb(),
        "wall_s": wall,
    }


def optimizer_step_s(spec: RunSpec, repeats: int = 5) -> float:
    """Median wall time of one optimizer step (Muon + AdamW, as the trainer builds them) on the spec's model,
    with random gradients: the step's share of a training step is what Muon's precision choice moves."""
    from blueberry.train.optim import build_optimizers

    built = build(spec, resolve_device(spec.train.device), spec.data.vocab_size, check_causal=False, peak=False)
    # build() leaves the model where it was built (the CPU); the trainer moves it before building its optimizers,
    # whose kernels (fused AdamW) and Muon's precision follow the parameters' device
    model = built.model.to(built.device)
    optimizers = build_optimizers(model, built.spec.train)
    generator = torch.Generator(device=built.device).manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * 1e-3
    times = []
    for _ in range(repeats + 1):  # the first builds the optimizers' state
        start = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
        if built.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def tracking_overhead(spec: RunSpec, steps: int, repeats: int = 3) -> dict:
    """Training time with the real trackers (run record + W&B offline) against no tracker, A/B interleaved.

    Both sides run the same steps with the spec's log_every; W&B init/finish are one-off costs and are timed
    separately. `log_share` is the time spent inside the trackers' log calls over the tracked training time.
    """
    from blueberry.tracking import RunRecord, Trackers, WandbTracker
    from blueberry.train import train
    from blueberry.train.device import prepare_process

    spec = bench_spec(spec, steps, log_every=spec.train.log_every)
    device = resolve_device(spec.train.device)
    prepare_process(device)  # as a run does
    precision = resolve_precision(spec.train.precision, device)
    data = SyntheticData(spec.data.vocab_size, spec.data.seq_len)
    off, on, log_share, init_s = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="blueberry-bench-") as tmp:
        old_env = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
        os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": tmp, "WANDB_SILENT": "true"})
        try:
            for repeat in range(repeats):
                for tracked in (False, True):
                    torch.manual_seed(spec.seed)
                    model = build_model(spec.model, data.vocab_size)
                    inner = None
                    if tracked:
                        run_dir = Path(tmp) / f"run{repeat}"
                        run_dir.mkdir()
                        started = time.perf_counter()
                        record = RunRecord(run_dir, {"run_id": run_dir.name, "spec": spec.to_json_dict()})
                        wandb = WandbTracker(
                            run_dir,
                            mode="offline",
                            project="blueberry-bench",
                            entity=None,
                            group="bench",
                            job_type="bench",
                            name=run_dir.name,
                            run_id=f"bench-{os.getpid()}-{repeat}",
                            tags=["bench"],
                            notes=None,
                            config=spec.to_json_dict(),
                        )
                        init_s.append(time.perf_counter() - started)
                        inner = Trackers(record, wandb)
                    tracker = ListTracker(inner)
                    start = time.perf_counter()
                    train(spec, model, data, tracker, device, precision)
                    elapsed = time.perf_counter() - start
                    if tracked:
                        tracker.finish("finished")
                        on.append(elapsed)
                        log_share.append(tracker.seconds / elapsed)
                    else:
                        off.append(elapsed)
        finally:
            for key, value in old_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return {
        "steps": steps,
        "log_every": spec.train.log_every,
        "off_s": statistics.median(off),
        "on_s": statistics.median(on),
        "overhead": statistics.median(on) / statistics.median(off) - 1,
        "log_share": statistics.median(log_share),
        "wandb_init_s": statistics.median(init_s),
        "off_all": off,
        "on_all": on,
    }


def first_step_latency(spec_path: str, cold: bool, timeout_s: float = 300) -> dict:
    """Seconds from launching `blueberry run SPEC` to the first logged step (step 1) in its run record.

    cold: a fresh cache, so the tokenizer is trained and the corpus tokenised first; warm: the usual cache.
    The run is cut to 2 steps and logs every step; it runs offline into a temporary directory and is killed
    once its first step is logged.
    """
    with tempfile.TemporaryDirectory(prefix="blueberry-latency-") as tmp:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": tmp, "WANDB_SILENT": "true"}
        if cold:
            env["BLUEBERRY_CACHE"] = str(Path(tmp) / "cache")
        runs = Path(tmp) / "runs"
        argv = [sys.executable, "-m", "blueberry", "run", spec_path, "--train.steps=2", "--train.log_every=1"]
        argv += ["--train.eval_every=1000", "--train.progress=False", f"--tracking.runs_root={runs}"]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        latency = None
        try:
            while latency is None and time.perf_counter() - start < timeout_s:
                for path in runs.glob("*/*/metrics.jsonl"):
                    lines = path.read_text().splitlines()
                    if any(json.loads(line).get("step") == 1 for line in lines if line.strip()):
                        latency = time.perf_counter() - start
                if proc.poll() is not None and latency is None:
                    break
                time.sleep(0.05)
        finally:
            # measured (the rest, its final evaluation, is not what is measured), timed out, or interrupted:
            # the run must not go on alone
            running = proc.poll() is None
            proc.kill()
        _, stderr = proc.communicate()
    if latency is None:
        ended = f"still running after {timeout_s:.0f} s" if running else f"exit {proc.returncode}"
        raise RuntimeError(f"`blueberry run` logged no first step ({ended}): {stderr[-2000:]}")
    return {"first_step_s": latency, "cold_cache": cold}
