"""The training loop: micro-batches → optimizer steps → metrics to the tracker.

Host synchronisation (`.item()`) happens only on log and eval steps, so the loop
does not stall the device on the other steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import time

import torch
import torch.nn.functional as F

from blueberry.spec import RunSpec
from blueberry.train.evaluate import evaluate
from blueberry.train.optim import build_optimizers
from blueberry.train.schedule import build_schedulers

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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


def router_metrics(load_sums: list[torch.Tensor], balance_sums: list[torch.Tensor], micro_steps: int) -> dict:
    """Per-layer, per-expert share of routed tokens, plus the balance loss, averaged over micro-steps."""
    metrics = {}
    for layer, (load, balance) in enumerate(zip(load_sums, balance_sums)):
        load = (load / micro_steps).tolist()
        for expert, share in enumerate(load):
            metrics[f"moe/layer{layer}/load_e{expert}"] = share
        metrics[f"moe/layer{layer}/load_max"] = max(load)
        metrics[f"moe/layer{layer}/balance_loss"] = balance.item() / micro_steps
    return metrics


def train(spec: RunSpec, model, data, tracker, device: torch.device, precision: str, progress=None) -> dict:
    """Train `model` per `spec.train`; log through `tracker`; return the final summary metrics."""
    cfg = spec.train
    model.to(device)
    model.train()
    optimizers = build_optimizers(model, cfg)
    schedulers = build_schedulers(optimizers, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    sampler = data.train_sampler(cfg.batch_size, spec.seed)
    val_windows = data.val_windows()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.grad_accum * spec.data.seq_len
    clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf

    summary: dict = {}
    best_val = math.inf
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    load_sums: list[torch.Tensor] = []
    balance_sums: list[torch.Tensor] = []
    micro_in_window = 0
    window_start = time.perf_counter()
    started = window_start
    tokens_seen = 0

    for step in range(1, cfg.steps + 1):
        for micro in range(cfg.grad_accum):
            batch = sampler.batch((step - 1) * cfg.grad_accum + micro).to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast():
                out = model(inputs)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
            loss = ce + out.aux_loss
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += ce.detach()
            aux_sum += out.aux_loss.detach()
            if not load_sums:
                load_sums = [torch.zeros_like(s.load) for s in out.router_stats]
                balance_sums = [torch.zeros_like(s.balance_loss) for s in out.router_stats]
            for i, stats in enumerate(out.router_stats):
                load_sums[i] += stats.load
                balance_sums[i] += stats.balance_loss
            micro_in_window += 1

        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step_lrs = [opt.param_groups[0]["lr"] for opt in optimizers]  # the LRs this update used
        for sched in schedulers:
            sched.step()
        tokens_seen += tokens_per_step

        is_last = step == cfg.steps
        if step % cfg.log_every == 0 or is_last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            train_loss = loss_sum.item() / micro_in_window
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"train loss is {train_loss} at step {step}")
            steps_in_window = micro_in_window / cfg.grad_accum
            metrics = {
                "train/loss": train_loss,
                "train/aux_loss": aux_sum.item() / micro_in_window,
                "train/lr": step_lrs[0],
                "train/grad_norm": grad_norm.item(),
                "trainer/tokens": tokens_seen,
                "perf/tokens_per_s": steps_in_window * tokens_per_step / (now - window_start),
                "perf/step_time_s": (now - window_start) / steps_in_window,
                "perf/peak_memory_mb": peak_memory_mb(device),
                "perf/elapsed_s": now - started,
            }
            if len(step_lrs) > 1:
                metrics["train/lr_adamw"] = step_lrs[-1]
            metrics.update(router_metrics(load_sums, balance_sums, micro_in_window))
            tracker.log(metrics, step)
            summary.update({k: v for k, v in metrics.items() if k.startswith(("train/", "perf/"))})
            loss_sum.zero_()
            aux_sum.zero_()
            load_sums, balance_sums, micro_in_window = [], [], 0
            if progress is not None:
                progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
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

    summary.update(
        {
            "val/best_loss": best_val,
            "trainer/step": cfg.steps,
            "trainer/tokens": tokens_seen,
            "time/train_s": time.perf_counter() - started,
        }
    )
    return summary
