"""One run, end to end: spec → data + model → causality check → trainer → trackers → run record."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blueberry import distributed
from blueberry.data import prepare_data
from blueberry.gpu_monitor import GpuMonitor
from blueberry.hardware import plan_run, resolve_device, resolve_precision, run_cost
from blueberry.models import assert_causal, build_model, count_parameters
from blueberry.perf import PerfTracker
from blueberry.provenance import code_version, library_versions
from blueberry.spec import RunSpec
from blueberry.tracking import RunRecord, Trackers, WandbTracker, read_metrics, resolve_mode
from blueberry.tracking.preflight import runs_root_for
from blueberry.tracking.record import RunDir, claim_run_dir
from blueberry.tracking.wandb_log import held_rows
from blueberry.train import train
from blueberry.train.checkpoint import Checkpointer, ResumeError, checkpoint_paths, weights_digest
from blueberry.train.trainer import StopRequest, TrainingInterrupted


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the batch size and a smaller one to try."""


@dataclass
class RunResult:
    run_dir: Path | None  # None on torchrun ranks other than 0, which record nothing
    wandb_dir: str | None
    wandb_mode: str
    summary: dict


def execute(spec: RunSpec, *, log=print, resume: bool | None = None) -> RunResult:
    """Run `spec`. Bad input fails before anything is written; a failure mid-run is recorded as such.

    `resume`: None continues an unfinished attempt of the same run id (crashed or interrupted), True
    also a failed one and requires a checkpoint, False always starts a new run directory.
    """
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    torch.set_flush_denormal(True)  # denormals made CPU steps ~15x slower in the data-facts measurements
    started = time.time()
    device = resolve_device(spec.train.device)
    world, device = distributed.init(device)  # under torchrun: join the group, one GPU per rank
    if world.distributed:  # the other ranks cannot follow rank 0 into a checkpoint: always a new run
        if resume:
            raise ResumeError("resuming a multi-process (torchrun) run is not supported: start it again")
        resume = False
    precision = resolve_precision(spec.train.precision, device)

    data = prepare_data(spec.data, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.vocab_size)
    # The reference's MLA variants "learned" by seeing the future; a leaking model never trains here.
    assert_causal(model, data.vocab_size, seq_len=min(32, spec.data.seq_len))
    params = count_parameters(model)
    plan = plan_run(spec, device, model, data.vocab_size, world.size)
    train_spec = plan.apply(spec)  # batch_size 'auto' made concrete; the record keeps the spec as written
    if spec.train.compile:
        model.compile()  # in place: parameter names and checkpoints stay those of the plain model
    if world.distributed:
        torch.manual_seed(spec.seed + world.rank)  # same initial weights, but each rank its own dropout masks
    if not world.is_main:  # rank 0 alone tracks and records; the others train in step with it
        try:
            summary = train(train_spec, model, data, distributed.NullTracker(), device, precision)
        finally:
            distributed.shutdown()
        return RunResult(run_dir=None, wandb_dir=None, wandb_mode="disabled", summary=summary)
    mode, why = resolve_mode(spec.tracking.wandb)

    spec_hash = spec.spec_hash()
    # Under a sweep (ours or `wandb agent`) the run id is given: the record dir is named after it.
    run_id = os.environ.get("WANDB_RUN_ID") or f"{spec.run_name}-{spec_hash[:8]}"
    runs_root = runs_root_for(spec)
    claimed = claim_run_dir(
        runs_root, spec.experiment, run_id, reuse=None if resume is False else _resumable(resume), create=not resume
    )
    if claimed is None:
        raise ResumeError(f"nothing to resume: no unfinished run {run_id} with a checkpoint in {runs_root}")
    for skipped, why in claimed.skipped:
        log(f"not resuming {skipped}: its record is unreadable ({why}); left as it is")
    run_dir = claimed.path
    checkpointer = Checkpointer(
        run_dir / "checkpoints", spec_hash, spec.train.checkpoint_every, spec.train.keep_checkpoints
    )
    try:
        resume_state = _resume_state(claimed, checkpointer, spec_hash, log)
    except BaseException:
        claimed.release()
        raise
    sweep = sweep_context()
    header = {
        "run_id": run_dir.name,
        "name": spec.run_name,
        "experiment": spec.experiment,
        "seed": spec.seed,
        "sweep": sweep,
        "spec_hash": spec_hash,
        "spec": spec.to_json_dict(),
        "params": {"total": params.total, "active": params.active, "embedding": params.embedding},
        "data": {
            "fingerprint": data.fingerprint,
            "stats": data.stats,
            "leakage": data.leakage,
            "unigram_loss": data.unigram_loss,
        },
        "causality": {"checked": True, "ok": True},
        "hardware": plan.header(),  # device, precision, threads, preset, batch choice, peak FLOP/s, price
        "wandb": {"mode": mode, "why": why},
        "code": code_version(),
        "libraries": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    resume_step = resume_state["step"] if resume_state else 0
    record = RunRecord(run_dir, header, resume_step=resume_step if claimed.reused else None)
    log(
        f"run {run_dir.name}: {spec.model.variant}, {params.total / 1e6:.2f}M params "
        f"({params.active / 1e6:.2f}M active), {device} {precision}, W&B {mode} ({why})"
    )
    if claimed.reused:
        log(
            f"resuming the {claimed.previous_state} run from step {resume_step}"
            + ("" if resume_state else " (no checkpoint)")
        )
    stop = StopRequest().install()
    trackers = Trackers(record)
    wandb_tracker = None
    try:
        wandb_tracker = WandbTracker(
            run_dir,
            mode=mode,
            project=spec.tracking.project,
            entity=spec.tracking.entity,
            group=spec.experiment,
            job_type=spec.tracking.job_type,
            name=spec.run_name,
            run_id=run_dir.name,
            resume=claimed.reused,
            tags=[spec.model.variant, *spec.tags, *([f"sweep:{sweep['name']}"] if sweep else [])],
            notes=spec.tracking.notes,
            config={
                **spec.to_json_dict(),
                "variant": spec.model.variant,
                "spec_hash": spec_hash,
                "params_total": params.total,
                "params_active": params.active,
                "data_fingerprint": data.fingerprint,
                "unigram_loss": data.unigram_loss,
                "leakage_val_windows": data.leakage["val_windows_with_train_ngram"],
                "hardware": plan.header(),
            },
        )
        monitor = GpuMonitor().start()  # inert without NVML
        trackers = PerfTracker(Trackers(record, wandb_tracker), plan.flops_per_token, plan.peak_flops, monitor)
        if claimed.reused and mode == "offline":
            _replay_to_wandb(wandb_tracker, run_dir, resume_step, log)
        if spec.tracking.wandb_checkpoints and mode != "disabled":
            checkpointer.on_save = wandb_tracker.log_checkpoint
        progress = _progress_bar(spec)
        try:
            summary = train(
                train_spec,
                model,
                data,
                trackers,
                device,
                precision,
                progress,
                checkpointer=checkpointer,
                resume=resume_state,
                stop=stop,
            )
        finally:
            if progress is not None:
                progress.close()
        summary["weights/sha256"] = weights_digest(model)
        summary["unigram_loss"] = data.unigram_loss
        summary["params/total"] = params.total
        summary["params/active"] = params.active
        summary.update(monitor.stop())
        summary.update(run_cost(plan.price_per_hour, time.time() - started, world.size))
        trackers.summary(summary)
        trackers.finish("finished")
    except TrainingInterrupted as exc:
        trackers.finish("interrupted", str(exc))
        raise
    except KeyboardInterrupt:
        trackers.finish("interrupted", "KeyboardInterrupt")
        raise
    except torch.OutOfMemoryError as exc:
        message = _out_of_memory_advice(train_spec, device)
        trackers.finish("failed", message)
        raise OutOfMemory(message) from exc
    except BaseException as exc:
        trackers.finish("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop.restore()
        claimed.release()
        distributed.shutdown()
    wandb_dir = wandb_tracker.offline_dir if wandb_tracker else None
    return RunResult(run_dir=run_dir, wandb_dir=wandb_dir, wandb_mode=mode, summary=summary)


def _resumable(resume: bool | None):
    """Which earlier attempt of the run id to continue (README, "Checkpoints and resume")."""

    def accept(path: Path, state: str) -> bool:
        if state == "finished":
            return False
        if resume:  # --resume: a failed run too, but only from a checkpoint
            return bool(checkpoint_paths(path / "checkpoints"))
        return state in ("running", "interrupted")  # crashed or stopped; from step 0 if it left no checkpoint

    return accept


def _resume_state(claimed: RunDir, checkpointer: Checkpointer, spec_hash: str, log=print) -> dict | None:
    """The latest checkpoint of a reused run directory, checked against this spec; None to start at step 0."""
    if not claimed.reused:
        return None
    spec_file = claimed.path / "spec.json"
    previous_hash = json.loads(spec_file.read_text()).get("spec_hash") if spec_file.exists() else spec_hash
    if previous_hash != spec_hash:
        raise ResumeError(
            f"{claimed.path} holds a run of another spec (spec hash {str(previous_hash)[:12]}, "
            f"this spec {spec_hash[:12]}): use another run id or --no-resume"
        )
    checkpointer.clean_partial()
    state, skipped = checkpointer.load_newest()
    for aside, why in skipped:
        log(f"skipped a corrupt checkpoint, kept as {aside}: {why}")
    return state


def _replay_to_wandb(tracker: WandbTracker, run_dir: Path, resume_step: int, log=print) -> None:
    """Re-log the record's rows up to the checkpoint that no earlier offline W&B segment holds.

    Offline, wandb-core writes its log to disk every 15 s and when the run finishes, so an attempt killed
    with SIGKILL loses its last rows there (the local record has them). Online they reached the server.
    """
    held, unreadable = held_rows((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for problem in unreadable:
        log(f"W&B segment unreadable, its rows are logged again: {problem}")
    for row in read_metrics(run_dir / "metrics.jsonl"):
        if row["step"] <= resume_step and (row["step"], "val/loss" in row) not in held:
            tracker.log({k: v for k, v in row.items() if k not in ("step", "time")}, row["step"])


def _out_of_memory_advice(spec: RunSpec, device: torch.device) -> str:
    cfg = spec.train
    said = f"out of memory on {device} with train.batch_size={cfg.batch_size} (grad_accum {cfg.grad_accum})"
    if cfg.batch_size == 1:
        return f"{said}: try a shorter --data.seq_len (now {spec.data.seq_len}) or a smaller model"
    smaller = cfg.batch_size // 2
    return (
        f"{said}: try --train.batch_size={smaller} --train.grad_accum={cfg.grad_accum * 2} "
        f"(the same tokens per optimizer step)"
    )


def sweep_context() -> dict | None:
    """The sweep this run is a trial of: `blueberry sweep` (BLUEBERRY_SWEEP_*) or `wandb agent` (WANDB_SWEEP_ID)."""
    sweep_id = os.environ.get("BLUEBERRY_SWEEP_ID") or os.environ.get("WANDB_SWEEP_ID")
    if not sweep_id:
        return None
    return {"id": sweep_id, "name": os.environ.get("BLUEBERRY_SWEEP_NAME") or sweep_id}


def _progress_bar(spec: RunSpec):
    if not spec.train.progress:
        return None
    import sys

    from tqdm.auto import tqdm

    # In a log file (not a terminal) redraw rarely instead of writing a line per step.
    return tqdm(
        total=spec.train.steps,
        desc=spec.run_name,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30,
    )
