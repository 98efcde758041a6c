"""The training loop: micro-batches → optimizer steps → metrics to the tracker → checkpoints.

Host synchronisation (`.item()`) happens only on log, eval and checkpoint steps, so the loop does not
stall the device on the other steps. A NaN/inf loss or gradient norm is noted on the device every step
and raised at the next sync, naming the first bad step, and always before a checkpoint is written:
every checkpoint on disk is a good one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import signal
import threading
import time

import torch
import torch.nn.functional as F

from blueberry import distributed
from blueberry.spec import RunSpec
from blueberry.train.checkpoint import Checkpointer, rng_state, set_rng_state
from blueberry.train.evaluate import evaluate
from blueberry.train.optim import build_optimizers
from blueberry.train.schedule import build_schedulers

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a step; a checkpoint of that step was saved."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f", checkpoint {checkpoint}" if checkpoint else ", no checkpoint"
        super().__init__(f"{signal.Signals(signum).name} at step {step}{saved}")


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second signal stops at once.

    Handlers are installed only from the main thread (Python delivers signals there); `restore` puts back
    the previous ones.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def autocast_for(device: torch.device, precision: str):
    """A zero-argument context factory: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricWindow:
    """Train metrics summed on the device over the micro-steps since the last log.

    Part of the checkpoint: a run resumed between two log steps logs the very same sums.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.aux = torch.zeros((), device=self.device)
        self.load: list[torch.Tensor] = []
        self.balance: list[torch.Tensor] = []
        self.micro = 0

    def add(self, ce: torch.Tensor, aux: torch.Tensor, router_stats) -> None:
        self.loss += ce.detach()
        self.aux += aux.detach()
        if not self.load:
            self.load = [torch.zeros_like(s.load) for s in router_stats]
            self.balance = [torch.zeros_like(s.balance_loss) for s in router_stats]
        for i, stats in enumerate(router_stats):
            self.load[i] += stats.load
            self.balance[i] += stats.balance_loss
        self.micro += 1

    def metrics(self) -> dict:
        """Mean loss, aux loss and, per MoE layer, each expert's share of routed tokens, the balance loss, the load
        entropy (normalised: 1 = every expert equally loaded) and the experts that got no token in the window."""
        metrics = {"train/loss": self.loss.item() / self.micro, "train/aux_loss": self.aux.item() / self.micro}
        for layer, (load, balance) in enumerate(zip(self.load, self.balance)):
            load = (load / self.micro).tolist()
            for expert, share in enumerate(load):
                metrics[f"moe/layer{layer}/load_e{expert}"] = share
            metrics.update({f"moe/layer{layer}/{k}": v for k, v in distributed.load_statistics(load).items()})
            metrics[f"moe/layer{layer}/balance_loss"] = balance.item() / self.micro
        return metrics

    def state_dict(self) -> dict:
        return {"loss": self.loss, "aux": self.aux, "load": self.load, "balance": self.balance, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.aux = state["loss"].to(self.device), state["aux"].to(self.device)
        self.load = [t.to(self.device) for t in state["load"]]
        self.balance = [t.to(self.device) for t in state["balance"]]
        self.micro = state["micro"]


def train(
    spec: RunSpec,
    model,
    data,
    tracker,
    device: torch.device,
    precision: str,
    progress=None,
    *,
    checkpointer: Checkpointer | None = None,
    resume: dict | None = None,
    stop: StopRequest | None = None,
) -> dict:
    """Train `model` per `spec.train`, from the checkpoint `resume` if given; log through `tracker`.

    Saves a checkpoint every `checkpointer.every` steps and at the last step, and when `stop` is set
    (then raises TrainingInterrupted). Returns the final summary metrics.
    """
    cfg = spec.train
    model.to(device)
    model.train()
    world = distributed.current()
    ddp_model = distributed.wrap(model, device)  # the model itself in a one-process run
    optimizers = build_optimizers(model, cfg)
    schedulers = build_schedulers(optimizers, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    sampler = data.train_sampler(cfg.batch_size, spec.seed)
    val_windows = data.val_windows()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world.size * spec.data.seq_len  # all ranks
    clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf

    summary: dict = {}
    window = MetricWindow(device)
    best_val = math.inf
    start_step, elapsed_before = 0, 0.0
    # First step whose loss or (unscaled) grad norm was NaN/inf, 0 for none: kept on the device, read at syncs.
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    if resume is not None:
        model.load_state_dict(resume["model"])
        for opt, state in zip(optimizers, resume["optimizers"], strict=True):
            opt.load_state_dict(state)
        for sched, state in zip(schedulers, resume["schedulers"], strict=True):
            sched.load_state_dict(state)
        scaler.load_state_dict(resume["scaler"])
        window.load_state_dict(resume["window"])
        start_step, best_val, elapsed_before = resume["step"], resume["best_val"], resume["elapsed_s"]
        summary = dict(resume["summary"])  # complete even if the run died after its final checkpoint
        set_rng_state(resume["rng"])  # last: nothing above may draw from the RNGs the loop uses
        if progress is not None:
            progress.update(start_step)
    window_start = time.perf_counter()
    started = window_start - elapsed_before
    steps_timed = 0

    def check_finite() -> None:
        if bad := bad_step.item():
            last_good = checkpointer.latest() if checkpointer else None
            kept = f"; last good checkpoint: {last_good}" if last_good else ""
            raise TrainingDiverged(f"train loss or gradient norm became NaN/inf at step {bad}{kept}")

    for step in range(start_step + 1, cfg.steps + 1):
        for micro in range(cfg.grad_accum):
            index = (step - 1) * cfg.grad_accum + micro
            batch = sampler.batch(index, world.rank, world.size).to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            # under DDP, gradients are all-reduced on the last micro-step only
            with distributed.sync_gradients(ddp_model, micro == cfg.grad_accum - 1):
                with autocast():
                    out = ddp_model(inputs)
                ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
                loss = ce + out.aux_loss
                scaler.scale(loss / cfg.grad_accum).backward()
            window.add(ce, out.aux_loss, out.router_stats)

        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        model.update_router_biases()  # model.balance = bias_update: outside backprop, after the step
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step_lrs = [opt.param_groups[0]["lr"] for opt in optimizers]  # the LRs this update used
        for sched in schedulers:
            sched.step()
        tokens_seen = step * tokens_per_step
        steps_timed += 1  # since window_start: after a resume, fewer than the window holds
        # The window sums stay NaN/inf once a bad value entered. With fp16 an inf grad norm is the
        # GradScaler's business (it skips that update), so only the loss counts then.
        finite = torch.isfinite(window.loss + window.aux)
        if not scaler.is_enabled():
            finite &= torch.isfinite(grad_norm)
        bad_step = torch.where((bad_step == 0) & ~finite, step, bad_step)

        is_last = step == cfg.steps
        if step % cfg.log_every == 0 or is_last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            check_finite()
            metrics = {
                **distributed.mean_metrics(window.metrics()),  # over ranks (one collective) under DDP
                "train/lr": step_lrs[0],
                "train/grad_norm": grad_norm.item(),
                "trainer/tokens": tokens_seen,
                "perf/tokens_per_s": steps_timed * tokens_per_step / (now - window_start),
                "perf/step_time_s": (now - window_start) / steps_timed,
                "perf/peak_memory_mb": peak_memory_mb(device),
                "perf/elapsed_s": now - started,
            }
            if len(step_lrs) > 1:
                metrics["train/lr_adamw"] = step_lrs[-1]
            tracker.log(metrics, step)
            summary.update({k: v for k, v in metrics.items() if k.startswith(("train/", "perf/"))})
            window.reset()
            steps_timed = 0
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
            window_start = time.perf_counter()

        if step % cfg.eval_every == 0 or is_last:
            eval_started = time.perf_counter()
            val = evaluate(model, val_windows, cfg.batch_size, device, autocast)
            if not math.isfinite(val["val/loss"]):
                raise TrainingDiverged(f"validation loss is {val['val/loss']} at step {step}")
            best_val = min(best_val, val["val/loss"])
            tracker.log({**val, "trainer/tokens": tokens_seen}, step)
            summary.update(val)
            window_start += time.perf_counter() - eval_started  # keep eval time out of the throughput figure
        if progress is not None:
            progress.update(1)

        stopping = stop is not None and stop.signum is not None
        path = None
        if checkpointer is not None and (
            checkpointer.due(step) or stopping or (is_last and checkpointer.every is not None)
        ):
            check_finite()
            saved_at = time.perf_counter()
            state = {
                "model": model.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "schedulers": [sched.state_dict() for sched in schedulers],
                "scaler": scaler.state_dict(),
                "window": window.state_dict(),
                "best_val": best_val,
                "summary": summary,
                "elapsed_s": saved_at - started,
                "rng": rng_state(),
            }
            path = checkpointer.save(state, step)
            window_start += time.perf_counter() - saved_at  # nor checkpoint time
        if stopping:
            raise TrainingInterrupted(stop.signum, step, path)

    summary.update(
        {
            "val/best_loss": best_val,
            "trainer/step": cfg.steps,
            "trainer/tokens": cfg.steps * tokens_per_step,
            "time/train_s": time.perf_counter() - started,
        }
    )
    return summary
