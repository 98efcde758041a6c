"""The training loop: micro-batches → optimizer steps → metrics to the tracker → checkpoints.

The loop's own host synchronisation (`.item()`) happens only on log, eval and checkpoint steps, so it does not
stall the device on the other steps (fp16's overflow check syncs every step, and `sorted` experts read their
counts per layer: README, "Hardware, cost and speed"). A NaN/inf loss or gradient norm is noted on the device
every step and raised at the next sync, naming the first bad step, and always before a checkpoint is written:
every checkpoint on disk is a good one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from blueberry import distributed
from blueberry.spec import RunSpec
from blueberry.terminal import detach_from_terminal, stop_signals
from blueberry.tracking.schema import keep_metric
from blueberry.train.checkpoint import Checkpointer, rng_state, set_rng_state
from blueberry.train.device import enable_tf32, to_device
from blueberry.train.evaluate import evaluate
from blueberry.train.metrics import MetricsProcessor
from blueberry.train.optim import build_optimizers
from blueberry.train.schedule import build_schedulers

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_BAD_STEP = 2**62  # stands for "no bad step" where ranks take the smallest first bad step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP stopped the run after a step; a checkpoint of that step was saved."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f", checkpoint {checkpoint}" if checkpoint else ", no checkpoint"
        super().__init__(f"{signal.Signals(signum).name} at step {step}{saved}")


class StoppedAtOnce(KeyboardInterrupt):
    """A second stop signal: the run stops where it is, without a checkpoint; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} again: stopped at once, no checkpoint")
        self.signum = signum


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second signal stops at once.

    SIGHUP (the terminal closed: an ssh session dropped) does the same after detaching stdout and stderr from
    the lost terminal; where SIGHUP is ignored (`nohup`) it stays ignored.

    Under torchrun every rank has one, and the ranks agree on the step to stop after (`distributed.StopVote`).
    Handlers are installed only from the main thread (Python delivers signals there); `restore` puts back the
    previous ones.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            detach_from_terminal()
        if self.signum is not None:
            raise StoppedAtOnce(signum)
        self.signum = signum

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in stop_signals()}
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
        """On the CPU: a checkpoint holds it, and under torchrun every rank's goes to rank 0 (`Trainer.rank_state`)."""
        cpu = [t.cpu() for t in (self.loss, self.aux)]
        load, balance = [t.cpu() for t in self.load], [t.cpu() for t in self.balance]
        return {"loss": cpu[0], "aux": cpu[1], "load": load, "balance": balance, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.aux = state["loss"].to(self.device), state["aux"].to(self.device)
        self.load = [t.to(self.device) for t in state["load"]]
        self.balance = [t.to(self.device) for t in state["balance"]]
        self.micro = state["micro"]


class Trainer:
    """Trains `model` per `spec.train` (after torchtitan's train.py: the parts are built here, `train` loops).

    `tracker` receives the rows: a MetricsProcessor, or any Tracker (then wrapped in a plain one). After each
    micro-step's forward the trainer hands the model its routing statistics, `model.note_routing(router_stats)`,
    and after every optimizer step calls `model.after_optimizer_step()`, each if the model defines it, then each
    of `callbacks` as callback(trainer, step): the place for updates outside backprop (e.g. router biases), kept
    out of the forward, which `torch.compile` traces.
    """

    def __init__(
        self,
        spec: RunSpec,
        model,
        data,
        tracker,
        device: torch.device,
        precision: str,
        progress=None,
        *,
        checkpointer: Checkpointer | None = None,
        stop: StopRequest | None = None,
        callbacks: Sequence[Callable[[Trainer, int], None]] = (),
    ):
        self.spec, self.cfg, self.model, self.device = spec, spec.train, model, device
        self.progress, self.checkpointer, self.stop = progress, checkpointer, stop
        cfg = self.cfg
        enable_tf32(device)
        model.to(device)
        model.train()
        self.world = world = distributed.current()
        self.ddp_model = distributed.wrap(model, device)  # the model itself in a one-process run
        self.optimizers = build_optimizers(model, cfg)
        self.schedulers = build_schedulers(self.optimizers, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.autocast = autocast_for(device, precision)
        self.sampler = data.train_sampler(cfg.batch_size, spec.seed)
        self.val_windows = data.val_windows()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * world.size * spec.data.seq_len  # all ranks
        self.clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        self.metrics = tracker if isinstance(tracker, MetricsProcessor) else MetricsProcessor(tracker)
        self.note_routing = getattr(model, "note_routing", None)
        hook = getattr(model, "after_optimizer_step", None)
        self.after_step = [*([lambda trainer, step: hook()] if hook else []), *callbacks]

        self.summary: dict = {}
        self.window = MetricWindow(device)
        self.best_val = math.inf
        # The lowest val loss among checkpointed steps (W&B's `best` checkpoint alias), which a resume goes on from:
        # the best of every evaluation may be a step never checkpointed, which no later checkpoint then beat.
        self.best_checkpoint_val = math.inf
        self.start_step, self.elapsed_before, self.wall_before, self.energy_before = 0, 0.0, 0.0, None
        # First step whose loss or (unscaled) grad norm was NaN/inf, 0 for none: kept on the device, read at syncs.
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)
        self.stop_vote = distributed.StopVote(lambda: self.stop.signum if self.stop is not None else None)

    # --- checkpoint state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [sched.state_dict() for sched in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "window": self.window.state_dict(),
            "best_val": self.best_val,
            "best_checkpoint_val": self.best_checkpoint_val,
            "summary": self.summary,
            "elapsed_s": self.metrics.elapsed(),
            "wall_s": self.metrics.wall_s(),
            "energy_wh": self.metrics.energy_wh(),
            "rng": rng_state(),
        }

    def rank_state(self) -> dict:
        """What differs between torchrun ranks: each draws its own dropout masks and sums its own losses."""
        return {"rng": rng_state(), "window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # A torchrun checkpoint holds every rank's RNG states and metric window; rank 0's are also the plain ones.
        own = state["ranks"][self.world.rank] if "ranks" in state else {"rng": state["rng"], "window": state["window"]}
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        for sched, sched_state in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sched_state)
        if state["scaler"]:  # empty from a run without fp16: `precision: auto` resolved otherwise where it began
            self.scaler.load_state_dict(state["scaler"])  # (a bf16 GPU, a CPU); here the loss scale starts afresh
        self.window.load_state_dict(own["window"])
        self.start_step, self.best_val, self.elapsed_before = state["step"], state["best_val"], state["elapsed_s"]
        self.best_checkpoint_val = state.get("best_checkpoint_val", self.best_val)  # checkpoints before it: as then
        self.wall_before = state.get("wall_s", self.elapsed_before)  # checkpoints before wall_s: training time
        self.energy_before = state.get("energy_wh")  # None: no GPU energy read, or a checkpoint from before it
        self.summary = dict(state["summary"])  # complete even if the run died after its final checkpoint
        set_rng_state(own["rng"])  # last: nothing above may draw from the RNGs the loop uses

    # --- one optimizer step ----------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[torch.Tensor, list[float]]:
        """grad_accum micro-batches, one optimizer step; returns the gradient norm and the LRs it used."""
        cfg = self.cfg
        # One autocast region around all micro-steps: autocast keeps each weight's bf16/fp16 cast until its
        # outermost region ends, so a weight is cast once per optimizer step (the only place it changes), not
        # once per micro-step. The loss and backward run with autocast off, as before.
        with self.autocast():
            for micro in range(cfg.grad_accum):
                index = (step - 1) * cfg.grad_accum + micro
                batch = to_device(self.sampler.batch(index, self.world.rank, self.world.size), self.device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                # under DDP, gradients are all-reduced on the last micro-step only
                with distributed.sync_gradients(self.ddp_model, micro == cfg.grad_accum - 1):
                    # chunked_loss: the model returns the loss, never the whole batch's logits
                    out = self.ddp_model(inputs, targets if cfg.chunked_loss else None)
                    with torch.autocast(self.device.type, enabled=False):
                        if cfg.chunked_loss:
                            ce = out.loss
                        else:
                            ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
                        loss = ce + out.aux_loss
                        self.scaler.scale(loss / cfg.grad_accum).backward()
                self.window.add(ce, out.aux_loss, out.router_stats)
                if self.note_routing is not None:
                    self.note_routing(out.router_stats)

        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # fp16: GradScaler skips only the optimizer whose own gradients overflowed, and the other (Muon and AdamW
        # split the parameters) would step on gradients the clip made NaN or zero: one overflow skips both.
        stepped = not self.scaler.is_enabled() or torch.isfinite(grad_norm).item()
        if stepped:
            for opt in self.optimizers:
                self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        step_lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers]  # the LRs this update used
        if stepped:  # the schedule counts updates: a skipped one leaves it where it was, as accelerate's does
            for sched in self.schedulers:
                sched.step()
        for callback in self.after_step:
            callback(self, step)
        # The window sums stay NaN/inf once a bad value entered. With fp16 an inf grad norm is the
        # GradScaler's business (it skips that update), so only the loss counts then.
        finite = torch.isfinite(self.window.loss + self.window.aux)
        if not self.scaler.is_enabled():
            finite &= torch.isfinite(grad_norm)
        self.bad_step = torch.where((self.bad_step == 0) & ~finite, step, self.bad_step)
        return grad_norm, step_lrs

    def check_finite(self, every_rank: bool = False) -> None:
        """Raise TrainingDiverged if a loss or gradient norm was NaN/inf. `every_rank` (a point all ranks reach,
        the log step): under torchrun the ranks agree first, as each rank's loss is its own; else one rank would
        stop while the others wait for it in the step's collectives."""
        bad = self.bad_step.item()
        if every_rank and self.world.distributed:
            bad = distributed.smallest_across_ranks(bad or NO_BAD_STEP) % NO_BAD_STEP  # the first bad step, or 0
        if bad:
            last_good = self.checkpointer.latest() if self.checkpointer else None
            kept = f"; last good checkpoint: {last_good}" if last_good else ""
            raise TrainingDiverged(f"train loss or gradient norm became NaN/inf at step {bad}{kept}")

    # --- what happens around a step --------------------------------------------------------------------

    def log_step(self, step: int, grad_norm: torch.Tensor, step_lrs: list[float]) -> None:
        now = self.metrics.sync()
        self.check_finite(every_rank=True)
        metrics = {
            **distributed.mean_metrics(self.window.metrics()),  # over ranks (one collective) under DDP
            "train/lr": step_lrs[0],
            "train/grad_norm": grad_norm.item(),
            "trainer/tokens": step * self.tokens_per_step,
        }
        if len(step_lrs) > 1:
            metrics["train/lr_adamw"] = step_lrs[-1]
        row = self.metrics.log_train(metrics, step, now)
        self.summary.update({k: v for k, v in row.items() if keep_metric(k)})
        self.window.reset()
        if self.progress is not None:
            postfix = {"loss": f"{row['train/loss']:.3f}", "tok_s": f"{row['perf/tokens_per_s']:.0f}"}
            self.progress.set_postfix(postfix, refresh=False)  # drawn at its next redraw: in a log file, rarely

    def eval_step(self, step: int) -> float:
        """Evaluate, log and return the val loss."""
        with self.metrics.paused():
            val = evaluate(self.model, self.val_windows, self.cfg.batch_size, self.device, self.autocast)
            if not math.isfinite(val["val/loss"]):
                raise TrainingDiverged(f"validation loss is {val['val/loss']} at step {step}")
            self.best_val = min(self.best_val, val["val/loss"])
            self.metrics.log({**val, "trainer/tokens": step * self.tokens_per_step}, step)
            self.summary.update(val)
        return val["val/loss"]

    def checkpoint(self, step: int, val_loss: float | None = None):
        """Save a checkpoint of `step` (after checking the loss is finite; `val_loss`: the step's, if evaluated); its
        path. Under torchrun every rank comes here at the same steps and hands rank 0 its `rank_state`, which rank 0
        saves with its own state; the other ranks save nothing (None)."""
        self.check_finite(every_rank=True)  # so a NaN on one rank stops every rank here, naming the step
        if val_loss is not None:
            self.best_checkpoint_val = min(self.best_checkpoint_val, val_loss)
        with self.metrics.paused():
            ranks = distributed.gather_to_main(self.rank_state()) if self.world.distributed else None
            if not self.world.is_main:
                return None
            state = self.state_dict()
            if ranks is not None:
                state["ranks"] = ranks
            return self.checkpointer.save(state, step)

    def checkpoint_due(self, step: int, stopping: bool) -> bool:
        if self.checkpointer is None:
            return False
        is_last = step == self.cfg.steps
        return self.checkpointer.due(step) or stopping or (is_last and self.checkpointer.every is not None)

    # --- the loop --------------------------------------------------------------------------------------

    def train(self, resume: dict | None = None) -> dict:
        """Train from the checkpoint `resume` if given; returns the final summary metrics.

        Saves a checkpoint every `checkpointer.every` steps and at the last step, and when `stop` is set
        (then raises TrainingInterrupted).
        """
        cfg = self.cfg
        if resume is not None:
            self.load_state_dict(resume)
            if self.progress is not None:
                self.progress.update(self.start_step)
        self.metrics.begin(self.device, self.tokens_per_step, self.elapsed_before, self.wall_before, self.energy_before)
        for step in range(self.start_step + 1, cfg.steps + 1):
            self.stop_vote.send()
            grad_norm, step_lrs = self.train_step(step)
            self.metrics.step_done()
            is_last = step == cfg.steps
            if step % cfg.log_every == 0 or is_last:
                self.log_step(step, grad_norm, step_lrs)
            val_loss = self.eval_step(step) if step % cfg.eval_every == 0 or is_last else None
            if self.progress is not None:
                self.progress.update(1)
            signum = self.stop_vote.result()  # under torchrun, every rank's answer: they stop after the same step
            path = self.checkpoint(step, val_loss) if self.checkpoint_due(step, signum is not None) else None
            if signum is not None:
                raise TrainingInterrupted(signum, step, path)
        self.summary.update(
            {
                "val/best_loss": self.best_val,
                "trainer/step": cfg.steps,
                "trainer/tokens": cfg.steps * self.tokens_per_step,
                "time/train_s": self.metrics.elapsed(),
            }
        )
        return self.summary


def train(*args, resume: dict | None = None, **kwargs) -> dict:
    """`Trainer(*args, **kwargs).train(resume)`: train from the checkpoint `resume` if given; the summary."""
    return Trainer(*args, **kwargs).train(resume)
