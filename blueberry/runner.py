"""One run, end to end, in named stages (after lightning-hydra-template's src/train.py):

device, build (data, model, causality check, plan) → claim the run directory and resume → header → W&B
(first: if it cannot start, the record is left as it was) → run record → trackers (metrics processor) →
train → finalise. `recorded` maps a failure to the run's status, in one place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from blueberry import distributed
from blueberry.data import prepare_data
from blueberry.distributed import World
from blueberry.fileio import is_number, read_json
from blueberry.gpu_monitor import GpuMonitor, nvidia_driver_loaded
from blueberry.hardware import (
    BatchChoice,
    NotRunnableHere,
    bf16_emulated,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from blueberry.overrides import value_at
from blueberry.perf import QUICK_CEILING
from blueberry.plan import Build, RunPlan, build
from blueberry.provenance import code_version, library_versions
from blueberry.spec import RunSpec, safe_name
from blueberry.threads import FreeCoresWatch, choose_threads, pinned_threads, usable_cores
from blueberry.tracking import RunRecord, Trackers, WandbTracker, new_run_id, read_metrics, sweep_tag
from blueberry.tracking.preflight import runs_root_for
from blueberry.tracking.record import RunDir, claim_run_dir, locked_by_a_live_process
from blueberry.tracking.schema import METRICS_FILE, SPEC_FILE, make_header, wandb_config
from blueberry.tracking.wandb_log import held_rows
from blueberry.tracking.wandb_settings import Choice, describe, run_settings
from blueberry.tracking.wandb_tracker import wandb_segments
from blueberry.train.checkpoint import Checkpointer, FollowerCheckpointer, ResumeError, checkpoint_paths, weights_digest
from blueberry.train.device import prepare_process
from blueberry.train.metrics import MetricsProcessor
from blueberry.train.optim import optimizer_split
from blueberry.train.trainer import StopRequest, TrainingInterrupted, train

# What a run records of its time before training, as time/setup/<stage>_s in its summary, in the words printed
SETUP_STAGES = {"start": "Python + imports", "device": "device", "build": "data + model", "tracking": "record + W&B"}


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the batch size and a smaller one to try."""


@dataclass
class RunResult:
    run_dir: Path | None  # None on torchrun ranks other than 0, which record nothing
    wandb_dir: str | None
    wandb_mode: str
    summary: dict


@dataclass
class Run:
    """What the stages hand on: filled in as the run goes."""

    spec: RunSpec
    world: World
    data: object
    built: Build
    started: float  # wall clock at the start, for the run's cost
    claimed: RunDir | None = None
    checkpointer: Checkpointer | None = None
    resume_state: dict | None = None
    header: dict = field(default_factory=dict)
    tracker: object = None  # what a failure is reported to: the run record, then the full tracker stack
    wandb: WandbTracker | None = None
    sweep: dict | None = None  # the sweep this run is a trial of
    name: str = ""  # our name for it (display_name): W&B's default, the record's
    wandb_settings: dict[str, Choice] = field(default_factory=dict)  # wandb.init values and their sources
    wandb_id: str | None = None
    wandb_resume: str | None = None  # W&B's resume policy for wandb_id
    setup_s: dict[str, float] = field(default_factory=dict)  # time/setup/* seconds, into the summary
    followers_started: bool = False  # the other ranks got the resume point and train (torchrun)


def execute(spec: RunSpec, *, log=print, resume: bool | None = None, own_process: bool = False) -> RunResult:
    """Run `spec`. Bad input fails before anything is written; a failure mid-run is recorded as such.

    `resume`: None continues an unfinished attempt of the same run id (crashed or interrupted), True
    also a failed one and requires a checkpoint, False always starts a new run directory. `own_process`: the
    process was started for this run (`blueberry run`), so its age now is the run's start-up (time/setup/start_s).
    """
    start_s = _process_age_s() if own_process else None  # Python, imports, the spec
    started = time.time() - (start_s or 0.0)  # the run's wall clock (what its cost pays for) starts with its process
    setup_s = {"time/setup/start_s": start_s}
    with _timed(setup_s, "time/setup/device_s"):
        world, device = device_stage(spec, log)
    with _timed(setup_s, "time/setup/build_s"):
        data, built = build_stage(spec, world, device)
    run = Run(spec, world, data, built, started, setup_s=setup_s)
    if not world.is_main:  # rank 0 alone tracks, records and decides the resume; the others train in step with it
        stop = StopRequest().install()  # a signal stops every rank after the same step (distributed.StopVote)
        try:
            follower = FollowerCheckpointer(built.spec.train.checkpoint_every)
            resume_state = resume_point_from_main(stop)
            if resume_state is not None:  # rank 0's micro-batch split, its earlier attempt's (header_stage)
                built = with_batch(built, BatchChoice(**resume_state["batch"]))
            summary = train(
                built.spec, built.model, data, distributed.NullTracker(), built.device, built.precision,
                checkpointer=follower, resume=resume_state, stop=stop,
            )  # fmt: skip
            return RunResult(run_dir=None, wandb_dir=None, wandb_mode="disabled", summary=summary)
        finally:
            stop.restore()
            distributed.shutdown()
    run.sweep = sweep_context()
    ours = [spec.model.label, *([sweep_tag(run.sweep["name"])] if run.sweep else [])]
    # the spec, else W&B's own settings, else our defaults
    run.name = display_name(spec)
    run.wandb_settings = run_settings(spec, tags=ours, name=run.name)
    mode, why = run.wandb_settings["mode"].value, run.wandb_settings["mode"].source
    tracking = time.monotonic()
    stop = None
    try:
        claim_stage(run, resume, log)
        header_stage(run, mode, why, log)
        wandb_stage(run, log)  # before the record is touched: a W&B that cannot start leaves it as it was
        # From here a stop signal stops training cleanly; before, Ctrl-C interrupts W&B's wait for its server
        # at once (a KeyboardInterrupt out of wandb.init, exit 130), rather than after W&B's own time-out.
        stop = StopRequest().install()
        record_stage(run)
        with recorded(run):
            tracker_stage(run, mode, log)
            setup_s["time/setup/tracking_s"] = time.monotonic() - tracking
            summary = train_stage(run, stop)
            finalise_stage(run, summary, mode)
    except BaseException:
        if not run.followers_started:  # they wait for the resume point (train_stage): it will not come
            distributed.release_followers()
        raise
    finally:
        if stop is not None:
            stop.restore()
        if run.claimed is not None:
            run.claimed.release()
        distributed.shutdown()
    wandb_dir = run.wandb.offline_dir if run.wandb else None
    return RunResult(run_dir=run.claimed.path, wandb_dir=wandb_dir, wandb_mode=mode, summary=summary)


# --- the stages ------------------------------------------------------------------------------------------


def device_stage(spec: RunSpec, log=print) -> tuple[World, torch.device]:
    """Threads and the device (one GPU per rank under torchrun); an unavailable device or precision fails here."""
    threads, why = choose_threads(spec.train.threads)  # the spec, OMP_NUM_THREADS, else the cores free now
    torch.set_num_threads(threads)
    if why.endswith("busy with other processes") and threads < usable_cores():  # fewer than the cores: say why
        log(f"torch threads: {threads} ({why})")
    device = resolve_device(spec.train.device)
    if device.type == "cpu" and spec.train.device == "auto" and torch.version.cuda is None and nvidia_driver_loaded():
        log(
            f"an NVIDIA GPU is here, but this torch ({torch.__version__}) is a CPU build: training on the CPU "
            "(install a CUDA build of torch to use the GPU)"
        )
    prepare_process(device)  # denormals flushed; on a CPU, freed memory kept
    world, device = distributed.init(device)  # under torchrun: join the group, one GPU per rank
    hazard = distributed.restart_hazard()
    if hazard and world.is_main:
        log(hazard)
    precision = resolve_precision(spec.train.precision, device)  # before any data is prepared
    if bf16_emulated(device, precision):
        log(
            "train.precision 'bf16' on a CPU without native bf16 (no AMX or AVX512-BF16): its matrix products "
            "run 20-90x slower than fp32, which 'auto' picks here"
        )
    return world, device


def build_stage(spec: RunSpec, world: World, device: torch.device) -> tuple[object, Build]:
    """The data, then the model, its causality check, the plan (see plan.build)."""
    data = prepare_data(spec.data, spec.seed)
    built = build(spec, device, data.vocab_size, world.size)
    if world.distributed:
        torch.manual_seed(spec.seed + world.rank)  # same initial weights, but each rank its own dropout masks
    return data, built


def resume_point_from_main(stop: StopRequest) -> dict | None:
    """A rank other than 0: the checkpoint rank 0 resumes from (None: step 0), which it broadcasts once it is set up
    (train_stage). Rank 0 failing first ends this rank quietly (MainRankFailed): rank 0 said why, or torchrun
    did. A stop signal torchrun handed every rank kills a rank 0 that is not yet training, and gloo then fails
    this rank's broadcast ("Connection closed by peer"): this rank exits as interrupted by that signal too."""
    try:
        resume_state = distributed.broadcast_from_main(None)
    except torch.OutOfMemoryError:  # this rank's own failure (receiving the checkpoint): its traceback says why
        raise
    except RuntimeError as exc:  # gloo raises a plain RuntimeError for a peer that is gone
        raise distributed.MainRankFailed(str(exc), stop.signum) from exc
    if resume_state == distributed.MAIN_FAILED:  # rank 0 failed and told us (release_followers)
        raise distributed.MainRankFailed(resume_state, stop.signum)
    return resume_state


def claim_stage(run: Run, resume: bool | None, log) -> None:
    """Lock the run directory (an earlier attempt to continue, or a new one) and load the checkpoint to resume."""
    spec = run.spec
    spec_hash = spec.spec_hash()
    # Under a sweep (ours or `wandb agent`) the run id is given: the record dir is named after it. Otherwise
    # the directory is named after the spec, so an unfinished run of it is found again to resume.
    given_id = os.environ.get("WANDB_RUN_ID")
    run_id = given_id or f"{spec.run_name}-{spec_hash[:8]}"
    runs_root = runs_root_for(spec)  # $BLUEBERRY_RUNS_ROOT (a sweep) or tracking.runs_root
    for live in _attempts_of(Path(runs_root) / safe_name(spec.experiment), given_id) if given_id else ():
        if locked_by_a_live_process(live):  # a second directory would write the same W&B run
            raise NotRunnableHere(f"WANDB_RUN_ID={given_id}: a live process is running that run ({live})")
    job = distributed.torchrun_job()
    restarted = job is not None and job["restart"] > 0  # --no-resume too continues its own job's attempt then
    reuse = None if resume is False and not restarted else _resumable(resume, log, run.world.size, job)
    legacy = (spec.legacy_spec_hash(),)  # what records and checkpoints made before the bookkeeping left it hold
    claimed = None
    if not given_id and reuse is not None and legacy[0][:8] != spec_hash[:8]:  # such a run, under its older name
        claimed = claim_run_dir(runs_root, spec.experiment, f"{spec.run_name}-{legacy[0][:8]}", reuse, create=False)
    if claimed is None:
        claimed = claim_run_dir(runs_root, spec.experiment, run_id, reuse, create=not resume)
    if claimed is None:
        raise ResumeError(f"nothing to resume: no unfinished run {run_id} with a checkpoint in {runs_root}")
    for skipped, why in claimed.skipped:
        log(f"not resuming {skipped}: its record is unreadable ({why}); left as it is")
    run.checkpointer = Checkpointer(
        claimed.path / "checkpoints", spec_hash, spec.train.checkpoint_every, spec.train.keep_checkpoints,
        also_accept=legacy,
    )  # fmt: skip
    try:
        run.resume_state = _resume_state(claimed, run.checkpointer, (spec_hash, *legacy), run.data.fingerprint, log)
        if resume and run.resume_state is None and not restarted:  # every checkpoint it had was set aside
            raise ResumeError(f"nothing to resume: {claimed.path} has no readable checkpoint")
    except BaseException:
        claimed.release()
        raise
    run.claimed = claimed


def header_stage(run: Run, mode: str, why: str, log) -> None:
    """The run record's header (the W&B run it continues, for a resumed one); say what runs where."""
    claimed = run.claimed
    if run.resume_state is not None:  # one run's windows drawn at one micro-batch split, its MFU against one peak
        run.built = earlier_batch(run.built, claimed.path, log)
        run.resume_state["batch"] = asdict(run.built.plan.batch)  # for the other ranks under torchrun (execute)
        run.built.plan = earlier_peak(run.built.plan, claimed.path)
    spec, built, data = run.spec, run.built, run.data
    params = built.params
    split = optimizer_split(built.model, spec.train)  # parameters under Muon / AdamW
    run.wandb_id, run.wandb_resume = wandb_identity(claimed, os.environ.get("WANDB_RUN_ID"), mode, run.name)
    if claimed.reused:  # the W&B run to continue lives where its first attempt put it
        run.wandb_settings = {**run.wandb_settings, **stored_wandb_place(claimed.path)}
    run.header = make_header(
        run_id=claimed.path.name,
        name=run.name,
        spec=spec,
        params={"total": params.total, "active": params.active, "embedding": params.embedding, **split},
        data={
            "fingerprint": data.fingerprint,
            "stats": data.stats,
            "leakage": data.leakage,
            "unigram_loss": data.unigram_loss,
        },
        hardware=built.plan.header(),  # device, precision, threads, preset, batch choice, peak FLOP/s, price
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        sweep=run.sweep,
        wandb={"id": run.wandb_id, "resume": run.wandb_resume, **describe(run.wandb_settings)},
        code=code_version(),
        torchrun=distributed.torchrun_job(),  # a restart of this job continues this record (_resumable)
        libraries=library_versions(),
    )
    if run.header["code"].get("git_error"):  # else read as code installed outside any checkout
        log(f"the run record has no git commit: {run.header['code']['git_error']}")
    resume_step = run.resume_state["step"] if run.resume_state else 0
    log(
        f"run {claimed.path.name}: {spec.model.label}, {params.total / 1e6:.2f}M params "
        f"({params.active / 1e6:.2f}M active; {split['muon'] / 1e6:.2f}M under Muon, "
        f"{split['adamw'] / 1e6:.2f}M AdamW), {built.device} {built.precision}, W&B {mode} ({why})"
    )
    if claimed.reused:
        log(
            f"resuming the {claimed.previous_state} run from step {resume_step}"
            + ("" if run.resume_state else " (no checkpoint)")
        )


def wandb_stage(run: Run, log=print) -> None:
    """Start the W&B run (WandbUnavailable if W&B cannot)."""
    tracking = run.spec.tracking
    run.wandb = WandbTracker(
        run.claimed.path,
        **{name: choice.value for name, choice in run.wandb_settings.items()},
        run_id=run.wandb_id,
        resume=run.wandb_resume,
        # Left unset in the spec, W&B's own setting decides (WANDB__DISABLE_STATS), as for every W&B field.
        system_metrics=tracking.system_metrics if "system_metrics" in tracking.model_fields_set else None,
        log=log,
        config=wandb_config(run.header, name_the_sweep=bool(os.environ.get("BLUEBERRY_SWEEP_ID"))),
    )


def record_stage(run: Run) -> None:
    """Write the run record's header and mark the run running."""
    resume_step = (run.resume_state["step"] if run.resume_state else 0) if run.claimed.reused else None
    run.tracker = RunRecord(run.claimed.path, run.header, resume_step=resume_step)


def tracker_stage(run: Run, mode: str, log) -> None:
    """W&B and the run record behind the metrics processor (MFU, GPU readings, cost)."""
    spec, claimed, plan = run.spec, run.claimed, run.built.plan
    record = run.tracker
    if run.resume_state:  # the `best` checkpoint alias goes on from the best checkpointed val loss (Trainer)
        # a checkpoint written before it was kept: the best of every evaluation, as resumes took it then
        run.wandb.best_val_loss = run.resume_state.get("best_checkpoint_val", run.resume_state["best_val"])
    run.tracker = MetricsProcessor(
        Trackers(record, run.wandb),
        plan.flops_per_token,
        plan.peak_flops,
        GpuMonitor(devices=distributed.node_devices(run.world, run.built.device)).start(),  # inert without NVML
        price_per_hour=plan.price_per_hour,
        world_size=run.world.size,
        started=run.started,
    )
    if claimed.reused and mode == "offline":
        _replay_to_wandb(run.wandb, claimed.path, run.resume_state["step"] if run.resume_state else 0, log)
    if spec.tracking.wandb_checkpoints and mode != "disabled":
        run.checkpointer.on_save = run.wandb.log_checkpoint


def train_stage(run: Run, stop: StopRequest) -> dict:
    built = run.built
    distributed.broadcast_from_main(run.resume_state)  # under torchrun, to the other ranks (execute)
    run.followers_started = True
    progress = _progress_bar(run.spec, run.name)
    callbacks = []
    if built.device.type == "cpu" and not pinned_threads(run.spec.train.threads):
        # threads chosen from the cores free at the start: they follow the free cores as the run goes (threads.py)
        say = progress.write if progress is not None else print  # a line above the progress bar
        callbacks.append(FreeCoresWatch(torch.get_num_threads(), torch.set_num_threads, say))
    try:
        return train(
            built.spec,
            built.model,
            run.data,
            run.tracker,
            built.device,
            built.precision,
            progress,
            checkpointer=run.checkpointer,
            resume=run.resume_state,
            stop=stop,
            callbacks=callbacks,
        )
    finally:
        if progress is not None:
            progress.close()


def finalise_stage(run: Run, summary: dict, mode: str) -> None:
    """The summary's closing figures (weights digest, baselines, energy, cost), the final weights as a W&B
    model artifact when checkpoints go to W&B; the run is finished."""
    summary.update({key: value for key, value in run.setup_s.items() if value is not None})
    summary["weights/sha256"] = weights_digest(run.built.model)
    summary["unigram_loss"] = run.data.unigram_loss
    summary["params/total"] = run.built.params.total
    summary["params/active"] = run.built.params.active
    run.tracker.close(summary)
    run.tracker.summary(summary)
    if run.claimed.reused and mode != "disabled":  # W&B's best-so-far summaries saw only this attempt's rows
        run.wandb.summarise_history(read_metrics(run.claimed.path / METRICS_FILE))
    if run.spec.tracking.wandb_checkpoints and mode != "disabled":
        final = {"step": run.spec.train.steps, "val/loss": summary["val/loss"]}
        run.wandb.log_weights(run.built.model.state_dict(), final)
    run.tracker.finish("finished")


@contextlib.contextmanager
def recorded(run: Run):
    """The one place a failure becomes the run's status (interrupted | failed, with the reason); re-raised."""
    try:
        yield
    except TrainingInterrupted as exc:
        run.tracker.finish("interrupted", str(exc), 128 + exc.signum)
        raise
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        run.tracker.finish("interrupted", str(exc) or "KeyboardInterrupt", 128 + signum)
        raise
    except torch.OutOfMemoryError as exc:
        message = _out_of_memory_advice(run.built.spec, run.built.device)
        run.tracker.finish("failed", message, 1)
        raise OutOfMemory(message) from exc
    except BaseException as exc:
        run.tracker.finish("failed", f"{type(exc).__name__}: {exc}", 1)
        raise


# --- helpers ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str):
    start = time.monotonic()
    yield
    seconds[key] = time.monotonic() - start


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), so the run records what Python and the imports took
    before the run began; None where /proc is missing."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def wandb_identity(claimed: RunDir, given_id: str | None, mode: str, name: str) -> tuple[str, str | None]:
    """(W&B run id, resume policy) for this attempt (README, "W&B run ids and resume").

    Given an id (a sweep trial): keep it, and W&B's default policy as under `wandb agent`. A fresh run:
    a fresh id, "never" (a taken id is an error, never a merge). A resumed run: the id its first attempt
    stored in spec.json, "must" when both attempts are online (the W&B run exists), else "allow" (an offline
    attempt's run exists only after `wandb sync`).
    """
    if not claimed.reused:
        return (given_id, None) if given_id else (new_run_id(name), "never")
    previous = _stored_wandb(claimed.path)
    stored = previous.get("id") if isinstance(previous.get("id"), str) else None
    stored_id = given_id or stored or claimed.path.name  # records before ids were stored: the dir name
    then = previous.get("mode")  # {"value", "source"}; a plain string in records before sources were kept
    previous_mode = then.get("value") if isinstance(then, dict) else then
    return stored_id, "must" if mode == previous_mode == "online" else "allow"


FIRST = " (first attempt)"  # the source of a W&B value a resumed run keeps from its first attempt


def earlier_peak(plan: RunPlan, run_dir: Path) -> RunPlan:
    """`plan` with the peak FLOP/s of the run's earlier attempt where both measured a quick GEMM ceiling at their
    start with the same device, precision and threads: each measures its own, noisily (2x apart at a resume on a
    shared CPU), so one run's MFU rows changed scale at the resume and its record kept only the latest peak."""
    earlier = (read_json(run_dir / SPEC_FILE) or {}).get("hardware")
    if not isinstance(earlier, dict) or plan.peak_source != QUICK_CEILING:
        return plan
    alike = all(earlier.get(key) == getattr(plan, key) for key in ("device", "precision", "threads"))
    measured = str(earlier.get("peak_source")).startswith(QUICK_CEILING) and is_number(earlier.get("peak_flops"))
    if not (alike and measured):
        return plan
    return replace(plan, peak_flops=earlier["peak_flops"], peak_source=f"{QUICK_CEILING} (of the run's first attempt)")


def earlier_batch(built: Build, run_dir: Path, log=print) -> Build:
    """`built` with the micro-batch split of the run's earlier attempt where `batch_size: auto` chose another from
    the memory free now: the sampler draws each micro-step's windows by its index, so 8 x 4 trains on other windows
    than 32 x 1, and the resumed run ended unlike an uninterrupted one. Where the split chosen now is smaller (a
    larger one did not fit), the earlier one is kept all the same, and the run says it may run out of memory."""
    chosen = built.plan.batch
    hardware = (read_json(run_dir / SPEC_FILE) or {}).get("hardware")
    earlier = hardware.get("batch") if isinstance(hardware, dict) else None
    if chosen.how != "auto" or not isinstance(earlier, dict):
        return built
    micro, accum = earlier.get("micro_batch"), earlier.get("grad_accum")
    whole = type(micro) is int and type(accum) is int and micro > 0
    if not whole or micro * accum != chosen.micro_batch * chosen.grad_accum or micro == chosen.micro_batch:
        return built
    if micro > chosen.micro_batch:
        log(
            f"train.batch_size auto: the resumed run keeps its micro-batch of {micro} x {accum} accumulation (the "
            f"windows it trains on follow it), though the memory free now fits only {chosen.micro_batch} x "
            f"{chosen.grad_accum}: free memory if it runs out, or start a new run with --no-resume"
        )
    steps = built.spec.train.steps
    if resolve_compile(built.spec.train.compile, built.device, steps * accum) != built.plan.compile:
        # (the model was built, and compiled or not, for this attempt's split before the run's record was read)
        log(
            f"train.compile auto: this attempt {'compiles' if built.plan.compile else 'runs eager'}, decided from "
            f"the {chosen.micro_batch} x {chosen.grad_accum} split the memory free now gives, unlike its first "
            "attempt: set train.compile for a resume that runs as the first attempt did"
        )
    return with_batch(built, BatchChoice(micro, accum, chosen.effective_batch, "auto (of the run's first attempt)"))


def with_batch(built: Build, batch: BatchChoice) -> Build:
    """`built` training with the micro-batch split `batch`, its spec and record too."""
    plan = replace(built.plan, batch=batch)
    return replace(built, spec=plan.apply(built.spec), plan=plan)


def stored_wandb_place(run_dir: Path) -> dict[str, Choice]:
    """The W&B project, entity and directory an earlier attempt of this run used (its spec.json), so a resume
    continues that W&B run whatever the environment says now; fields it did not record are absent."""
    previous, place = _stored_wandb(run_dir), {}
    for field_name in ("project", "entity", "dir"):
        stored = previous.get(field_name)
        if isinstance(stored, dict) and "value" in stored:
            source = str(stored.get("source"))
            place[field_name] = Choice(stored["value"], source if source.endswith(FIRST) else f"{source}{FIRST}")
    return place


def _attempts_of(folder: Path, wandb_id: str) -> list[Path]:
    """The run directories of W&B run `wandb_id`: `<id>`, and the later attempts `<id>-2`, … that recorded it (a
    `<id>-2` may be the run given the id `<id>-2`)."""
    name = safe_name(wandb_id)
    later = folder.glob(f"{name}-*") if folder.is_dir() else ()
    ours = [d for d in later if d.name[len(name) + 1 :].isdigit() and _stored_wandb(d).get("id") == wandb_id]
    return [folder / name, *ours]


def _stored_wandb(run_dir: Path) -> dict:
    """The `wandb` section an earlier attempt wrote into spec.json ({} where missing or not an object)."""
    section = (read_json(run_dir / SPEC_FILE) or {}).get("wandb")
    return section if isinstance(section, dict) else {}


def _resumable(resume: bool | None, log=print, world_size: int = 1, job: dict | None = None):
    """Which earlier attempt of the run id to continue (README, "Checkpoints and resume"): only one run with as
    many processes as this one, whose global batch was the same. `job` (`distributed.torchrun_job`): after torchrun
    restarted its ranks (--max-restarts), the attempt an earlier start of the same job left, in any state but
    finished, whatever `resume` says: a rank that died fails rank 0's next collective, and the run is to go on."""

    hinted: list[Path] = []

    def accept(path: Path, state: str) -> bool:
        if state == "finished":
            return False
        header = read_json(path / SPEC_FILE) or {}
        hardware = header.get("hardware")
        ranks = hardware.get("world_size") if isinstance(hardware, dict) else None
        ranks = ranks if type(ranks) is int and ranks > 0 else 1  # records that do not say: one process
        if ranks != world_size:  # the global batch is the processes' together
            theirs = f"a torchrun run of {ranks} processes" if ranks > 1 else "a one-process run"
            ours = f"{world_size} processes" if world_size > 1 else "one process"
            if resume is not False:
                log(f"not resuming {path}: {theirs}, which {ours} cannot continue")
            return False
        own = _left_by_an_earlier_start(header, job)
        if resume is False:  # --no-resume: a new run, unless torchrun restarted this one
            return own
        if resume:  # --resume: a failed run too, but only from a checkpoint
            return own or bool(checkpoint_paths(path / "checkpoints"))
        if own or state in ("running", "interrupted"):  # crashed or stopped; from step 0 if no checkpoint
            return True
        if state == "failed" and not hinted and checkpoint_paths(path / "checkpoints"):  # a new run starts at step 0
            hinted.append(path)  # the first such attempt: the one `--resume` takes
            log(f"not resuming {path}: it failed; `--resume` continues it from its last checkpoint")
        return False

    return accept


def _left_by_an_earlier_start(header: dict, job: dict | None) -> bool:
    """Whether the attempt whose spec.json is `header` is this torchrun job's, from a start before torchrun
    restarted the ranks: the same rendezvous id (not torchrun's default, "none", which every job has) and a
    smaller restart count."""
    if not job or job["restart"] == 0:
        return False
    theirs = header.get("torchrun")
    theirs = theirs if isinstance(theirs, dict) else {}
    restart = theirs.get("restart")
    return theirs.get("id") == job["id"] != "none" and type(restart) is int and restart < job["restart"]


def _resume_state(
    claimed: RunDir, checkpointer: Checkpointer, hashes: tuple[str, ...], fingerprint: str, log=print
) -> dict | None:
    """The latest checkpoint of a reused run directory, checked against this spec (`hashes`: its spec_hash, then
    other hashes earlier records may hold of it) and this attempt's data (`fingerprint`); None to start at step 0."""
    if not claimed.reused:
        return None
    spec_file = claimed.path / SPEC_FILE
    previous = (read_json(spec_file) or {}) if spec_file.exists() else {"spec_hash": hashes[0]}
    previous_hash = previous.get("spec_hash")
    if previous_hash not in hashes:
        raise ResumeError(
            f"{claimed.path} holds a run of another spec (spec hash {str(previous_hash)[:12]}, "
            f"this spec {hashes[0][:12]}): use another run id or --no-resume"
        )
    # The spec hash covers a dataset's path, not its content: a file, tokenizer folder or Hub revision changed
    # since would continue weights trained on other tokens. Without a checkpoint nothing of them carries over.
    data = previous.get("data")
    trained_on = data.get("fingerprint") if isinstance(data, dict) else None
    if trained_on not in (None, fingerprint) and checkpoint_paths(checkpointer.dir):
        raise ResumeError(
            f"{claimed.path} was trained on other data (data fingerprint {str(trained_on)[:12]}, this data "
            f"{fingerprint[:12]}): put its data.dataset and data.tokenizer back as they were to resume it, or start "
            "a new run with --no-resume"
        )
    checkpointer.clean_partial()
    state, skipped = checkpointer.load_newest()
    for aside, why in skipped:
        log(f"skipped a corrupt checkpoint, kept as {aside}: {why}")
    return state


NON_FINITE = ("nan", "inf", "-inf")  # fileio.finite's strings


def _replay_to_wandb(tracker: WandbTracker, run_dir: Path, resume_step: int, log=print) -> None:
    """Re-log the record's rows up to the checkpoint that no earlier W&B segment (offline, or online: sent) holds.

    Offline, wandb-core writes its log to disk every 15 s and when the run finishes, so an attempt killed
    with SIGKILL loses its last rows there (the local record has them). Online they reached the server.
    """
    held, unreadable = held_rows(wandb_segments([tracker.dir, run_dir], tracker.run_id))
    for problem in unreadable:
        log(f"W&B segment unreadable, its rows are logged again: {problem}")
    for row in read_metrics(run_dir / METRICS_FILE):
        if row["step"] <= resume_step and (row["step"], "val/loss" in row) not in held:
            # The record keeps a diverged run's NaN/inf as strings (JSON has none): W&B gets numbers, as it did.
            metrics = {k: float(v) if v in NON_FINITE else v for k, v in row.items() if k not in ("step", "time")}
            tracker.log(metrics, row["step"])


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


# Parameters a run's default name shows already (spec.run_name), or whose values are no name's stuff
NAMED = {"experiment", "seed", "train.lr", "model.variant", "model.attention", "model.ffn", "tags", "name"}


def display_name(spec: RunSpec) -> str:
    """Our name for the run (W&B's display name, the record's): spec.run_name, to which a `blueberry sweep` trial
    adds the values its sweep varies that it does not show (BLUEBERRY_SWEEP_VARIES): the four trials of a seed
    in an experts × top-k grid had one name in W&B's charts."""
    if spec.name:  # the spec's own: as given
        return spec.name
    tree = spec.to_json_dict()
    varies = [path for path in os.environ.get("BLUEBERRY_SWEEP_VARIES", "").split(",") if path]
    return "-".join([spec.run_name, *(part for path in varies for part in _name_parts(path, value_at(tree, path)))])


def _name_parts(path: str, value) -> list[str]:
    """`<leaf><value>` for a varied parameter at `path` (a list's items joined by `_`); nothing for what the name
    shows already (NAMED), None, or a whole section."""
    if path in NAMED or value is None or isinstance(value, dict):
        return []
    items = value if isinstance(value, list) else [value]
    text = "_".join(f"{item:g}" if isinstance(item, float) else str(item) for item in items)
    return [safe_name(f"{path.rsplit('.', 1)[-1]}{text}")]


def sweep_context() -> dict | None:
    """The sweep this run is a trial of: `blueberry sweep` (BLUEBERRY_SWEEP_*) or `wandb agent` (WANDB_SWEEP_ID)."""
    sweep_id = os.environ.get("BLUEBERRY_SWEEP_ID") or os.environ.get("WANDB_SWEEP_ID")
    if not sweep_id:
        return None
    return {"id": sweep_id, "name": os.environ.get("BLUEBERRY_SWEEP_NAME") or sweep_id}


def _progress_bar(spec: RunSpec, name: str):
    if not spec.train.progress:
        return None
    from tqdm.auto import tqdm

    # In a log file (not a terminal) redraw rarely instead of writing a line per step.
    return tqdm(
        total=spec.train.steps,
        desc=name,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30,
    )
