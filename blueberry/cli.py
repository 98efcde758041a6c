"""`blueberry` command line: a thin layer over spec loading and the runner.

Exit codes: 0 ok, 1 the run failed, 2 bad input (spec, override, data source, unusable checkpoint),
130 interrupted by SIGINT, 143 by SIGTERM, 129 by SIGHUP (the terminal closed) (128 + the signal number).
"""

from __future__ import annotations

import difflib
import errno
import gc
import json
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from blueberry.overrides import SpecError, load_spec
from blueberry.spec import RunSpec
from blueberry.threads import limit_openmp_spinning

# Before anything imports torch (the commands import it lazily): OpenMP reads its spin count when torch loads it.
# Sweep trials and torchrun's workers are `blueberry` processes too, and inherit it.
limit_openmp_spinning()

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["-h", "--help"]}


FOLLOWER_GRACE_S = 30.0  # how long a rank leaves rank 0 to say an error every rank found


def _fail(message: str, code: int = 2, every_rank_finds: bool = False):
    """Say `message` and exit with `code`. `every_rank_finds`: an error of the spec itself, which every torchrun
    rank finds alike: said once, by rank 0 (an error of one rank's machine, its files, is said by that rank)."""
    rank = _torchrun_rank()
    if every_rank_finds and rank not in (None, 0):
        # torchrun checks its ranks every 0.1 s and stops the others at the first exit: were this rank's first, a
        # rank 0 a moment behind would be stopped before it said why. Rank 0 failing alike, torchrun ends this rank
        # here; still here, rank 0 did not (another machine's copy of the spec file): this rank says it.
        time.sleep(FOLLOWER_GRACE_S)
        message = f"rank {rank}: {message}"
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _torchrun_rank() -> int | None:
    """This process's rank in a torchrun job of several, else None (from the environment, as
    `distributed.env_world` and `torchrun_job` read it, without importing torch for a spec error)."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or _world_size() < 2:
        return None
    try:  # (a value that is no number is refused by the preflight; here it makes no job)
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return None


def _world_size() -> int:
    """The processes of this job, as `distributed.env_world` reads WORLD_SIZE (1 where it is unset, 1 or less, or
    no number, which the preflight refuses), without importing torch."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _refuse_torchrun(command: str, instead: str) -> None:
    """`sweep` and `study` start each trial as a process of its own. Under torchrun each rank would run the whole
    sweep, and its trials, inheriting torchrun's RANK, WORLD_SIZE and MASTER_ADDR/PORT, would join the trials of
    the other ranks in one process group: one trained with another's spec, the other failed."""
    if os.environ.get("TORCHELASTIC_RUN_ID") or _world_size() > 1:
        said = f"blueberry {command} starts its trials itself: run it without torchrun; {instead}"
        _fail(said, every_rank_finds=True)


def _check_batch_split(spec_path: str, spec: RunSpec) -> None:
    """Exit 2 where batch_size 'auto' cannot split train.effective_batch over the ranks: every rank finds it alike,
    so rank 0 says it, once, before torch loads (`hardware.resolve_batch` refuses it too, for callers of the
    runner)."""
    train, ranks = spec.train, _world_size()
    if train.batch_size == "auto" and train.effective_batch % ranks:
        said = f"{spec_path}: train.effective_batch ({train.effective_batch}) is not divisible by the {ranks} ranks"
        _fail(said, every_rank_finds=True)


def _check_data_inputs(spec_path: str, spec: RunSpec) -> None:
    """Exit 2 on the first data input a run would refuse (a dataset or tokenizer path), before torch loads."""
    from blueberry.data.inputs import input_problems

    for field, problem in input_problems(spec.data)[:1]:
        _fail(f"{spec_path}: {field}: {problem}")


def _check_out(out: str, setting: str = "--out") -> None:
    """Where a long measurement writes its results must be writable before it starts, not after."""
    from blueberry.tracking.preflight import PreflightError, check_writable_dir

    try:
        check_writable_dir(out, setting)
    except PreflightError as exc:
        _fail(str(exc))


def _close_to(name: str, names: list[str]) -> str:
    """A hint after an experiment name that has no runs: the close one (a typo), else the names that have runs."""
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; experiments with runs: {', '.join(names)}" if names else ""


def _load(spec_path, overrides, override_files) -> RunSpec:
    if spec_path and Path(spec_path).suffix in (".yaml", ".yml"):  # specs are JSON; sweep files are YAML
        _fail(_yaml_as_spec(spec_path))
    try:
        return load_spec(spec_path, overrides, override_files)
    except SpecError as exc:
        _fail(exc.render(), every_rank_finds=True)


def _yaml_as_spec(spec_path) -> str:
    """What to say of a YAML file given as a run spec: a W&B sweep file, how to run it; other YAML (a spec written
    as YAML), that specs are JSON."""
    from blueberry.sweep.config import holds_a_sweep

    try:
        sweep = holds_a_sweep(spec_path)
    except SpecError as exc:  # missing, unreadable: said as for a JSON spec
        return exc.render()
    if sweep:
        return (
            f"{spec_path} is a W&B sweep file, not a run spec: run it with `blueberry sweep {spec_path}` "
            "(or online with `wandb sweep` + `wandb agent`)"
        )
    return (
        f"{spec_path}: a run spec is a JSON file, as experiments/*.json (the same fields, e.g. "
        '{"model": {"variant": "mlp"}}); YAML files here are W&B sweep files, and this one has none of their keys'
    )


# A write the machine refuses, whatever the command was writing: said in a line, not a traceback.
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class Commands(click.Group):
    """The commands; a Ctrl-C (or SIGTERM, SIGHUP) that one does not handle itself, while its libraries load or it
    plans, exits 128 + the signal like every interruption, not with click's "Aborted!" (exit 1: a failure). A full
    disk exits 1 naming the file (the atomic writes leave no half-written one)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            _fail("interrupted", 128 + getattr(exc, "signum", signal.SIGINT))
        except OSError as exc:
            if exc.errno not in FULL_OR_READ_ONLY:
                raise
            _fail(f"{exc.filename or 'a file'}: {os.strerror(exc.errno)}", 1)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blueberry")
def main():
    """Blueberry: correct, tracked experiments for small Mixture-of-Experts LMs."""


# `main`'s context object in the `blueberry` console script, whose process ends with the command; `main` called
# in another program's process (tests' CliRunner) has none.
OWN_PROCESS = "own process"


@contextmanager
def _loading_libraries():
    """No garbage collections while torch, transformers and W&B load, and none walking them afterwards.

    Nothing they allocate is garbage, yet the heap's growth to 400,000-odd tracked objects sets off a full
    collection every quarter of growth, each walking all of them, and later ones walk them again. In our own
    process they live until exit, so gc.freeze() then moves them out of the collector's reach for good (the
    same reason as in `console_main`): a tiny `blueberry run` takes 9.6-10.0 s instead of 10.5-10.8 s on a
    2-core AMD EPYC, measured interleaved, and so does every sweep trial. Collections resume after the block:
    a long run's cycles are still freed.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if click.get_current_context().obj == OWN_PROCESS:
            gc.freeze()
        if was_enabled:
            gc.enable()


def console_main():
    """The `blueberry` console script and `python -m blueberry`: `main`, then the process exits.

    Whatever the command's outcome, its work is done and its files are closed when `main` returns or raises
    (SystemExit included). What is left is the interpreter's own teardown, whose garbage collections walk the
    400,000-odd objects torch, transformers and W&B keep alive: 1.1 s of a tiny `blueberry run`'s 13 s on
    a 2-core AMD EPYC, paid again by every sweep trial. gc.freeze() moves them out of the collector's reach;
    the exit handlers (W&B's, logging's) still run, and the OS takes the memory back.
    """
    try:
        main(obj=OWN_PROCESS)
    finally:
        gc.freeze()


@main.command()
@click.option("--quick", is_flag=True, help="Only Experiment 1 in miniature (what `make run` runs).")
@click.option("--only", "only", multiple=True, metavar="PART", help="Only this part (repeatable): exp1, exp2, ….")
@click.option(
    "--parallel", type=click.IntRange(min=1), help="Trials at once [default: one per GPU, else one per free core]."
)
@click.option("--runs-root", default="runs", show_default=True, help="Where run records and sweep state go.")
@click.option("--dry-run", is_flag=True, help="Print the parts, their sweep files and trial counts; run nothing.")
def study(quick, only, parallel, runs_root, dry_run):
    """Run the Blueberry report's study: every part's sweep, CPU twins on a CPU, the study's shapes on CUDA.
    Resumable: run it again and nothing finished runs twice."""
    _refuse_torchrun("study", "--parallel N runs N trials at once")
    import sys
    from datetime import UTC, datetime

    import torch

    from blueberry import study as plan
    from blueberry.sweep.state import SweepStateError
    from blueberry.threads import busy_cores_elsewhere, free_cores
    from blueberry.tracking.preflight import PreflightError, check_environment, check_writable_dir

    kind = plan.kind_of_machine(torch.cuda.is_available())
    try:
        loaded = plan.load_parts(plan.plan_parts(quick, only), kind)
        check_writable_dir(runs_root, "--runs-root")
        check_environment()
    except SpecError as exc:
        _fail(exc.render())
    except (PreflightError, ValueError) as exc:  # a bad runs root; an unknown --only part
        _fail(str(exc))
    if parallel is None:
        gpus = torch.cuda.device_count()
        parallel = gpus if gpus else plan.cpu_parallel(free_cores(busy_cores_elsewhere()))
    total = sum(len(planned) for *_, planned in loaded)
    click.echo(f"study on {kind}: {len(loaded)} part(s), {total} trials, {parallel} at once", err=True)
    for part, path, sweep, planned in loaded:
        click.echo(f"  {part.name}: {path} ({len(planned)} trials, sweep {sweep.sweep_id})", err=True)
    if dry_run:
        return
    started, results = datetime.now(UTC), []
    command = shlex.join(["blueberry", *sys.argv[1:]])
    recorded = not quick or plan.quick_is_the_studys(kind)

    def record():
        if not (recorded and results):  # (nothing ran: a sweep state that could not be read)
            return None
        return plan.write_record(results, runs_root, kind, command, parallel, started)

    def record_on_the_way_out():  # the study's own exit code and message matter more than its record
        try:
            return record()
        except OSError as exc:
            click.echo(f"warning: the study record could not be written: {exc}", err=True)
            return None

    def log(message):
        click.echo(message, err=True)

    try:
        plan.run_study(loaded, runs_root, parallel, log=log, results=results, part_ended=record_on_the_way_out)
    except SweepStateError as exc:
        record_on_the_way_out()
        _fail(f"{exc}: move it aside to start that sweep afresh")
    except KeyboardInterrupt as exc:  # Ctrl-C, or the sweep's SIGTERM / SIGHUP (terminal.StopSignal)
        record_on_the_way_out()  # the time the interrupted invocation spent counts when the study is resumed
        _fail("study interrupted; run the same command again to resume", 128 + getattr(exc, "signum", signal.SIGINT))
    path = record_on_the_way_out()
    for r in results:
        click.echo(f"{r.part.name}: {r.finished}/{r.planned} finished in {r.wall_s / 60:.1f} min")
        for line in r.failed:
            click.echo(f"  {line}")
    if path:
        click.echo(f"study record: {path}")
    if any(r.failed for r in results):
        click.echo(
            "failed trials stay failed when the study is run again, as a W&B sweep's do; to run them again, move "
            f"{runs_root}/_sweeps/<sweep-id>/state.json aside and run it again (its finished trials are adopted)",
            err=True,
        )
        sys.exit(1)


@main.command(context_settings=PASS_THROUGH)
@click.argument("spec_path", metavar="SPEC.json")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--overrides",
    "override_files",
    multiple=True,
    metavar="FILE",
    help="JSON file of overrides (W&B's ${args_json_file}); may repeat.",
)
@click.option(
    "--resume/--no-resume",
    default=None,
    help="--resume: continue this spec's unfinished or failed run from its last checkpoint (error if none). "
    "--no-resume: always a new run. Default: continue a crashed or interrupted run, else start a new one.",
)
def run(spec_path, overrides, override_files, resume):
    """Train one run from SPEC.json, with overrides such as --train.lr=0.003 or --model="{'n_experts': 8}"."""
    spec = _load(spec_path, overrides, override_files)
    _check_batch_split(spec_path, spec)
    from blueberry.data import DataError
    from blueberry.tracking.preflight import PreflightError, preflight

    # What can be checked before torch and transformers load (~7 s on a small CPU) is checked first. Under
    # torchrun the runs root and W&B are checked by rank 0 alone, which writes them: a rank 0 that refuses them
    # says so once and never joins the process group, which the other ranks cannot pass without it, and torchrun
    # then stops them. Every rank checks the environment it reads itself (its machine's prices).
    try:
        preflight(spec, records=_torchrun_rank() in (None, 0))
    except PreflightError as exc:
        _fail(str(exc))
    _check_data_inputs(spec_path, spec)
    with _loading_libraries():
        from blueberry.distributed import MainRankFailed, env_world
        from blueberry.hardware import NotRunnableHere
        from blueberry.models.causality import CausalityError
        from blueberry.runner import SETUP_STAGES, OutOfMemory, execute
        from blueberry.tracking.wandb_tracker import WandbUnavailable
        from blueberry.train.checkpoint import ResumeError
        from blueberry.train.trainer import TrainingDiverged, TrainingInterrupted

    try:
        own_process = click.get_current_context().obj == OWN_PROCESS
        result = execute(spec, log=lambda msg: click.echo(msg, err=True), resume=resume, own_process=own_process)
    except DataError as exc:
        _fail(f"{spec_path}: data: {exc}")
    except ResumeError as exc:
        _fail(f"cannot resume: {exc}")
    except NotRunnableHere as exc:  # device/precision not available here: still an input problem
        # the spec's choices on hardware the ranks share (a precision, a compile, a batch split): every rank finds it
        _fail(f"{spec_path}: {exc}", every_rank_finds=True)
    except PreflightError as exc:  # the runs root changed since preflight (or access() could not tell)
        _fail(str(exc))
    except MainRankFailed as exc:  # a torchrun rank: rank 0 says why
        sys.exit(exc.exit_code)
    except TrainingInterrupted as exc:
        if not env_world().is_main:  # a torchrun rank: rank 0 says where the checkpoint of every rank went
            sys.exit(128 + exc.signum)
        _fail(f"interrupted: {exc}; run the same command again to resume", 128 + exc.signum)
    except KeyboardInterrupt as exc:  # Ctrl-C outside training, or a second signal (StoppedAtOnce)
        _fail(f"interrupted: {exc}" if str(exc) else "interrupted", 128 + getattr(exc, "signum", signal.SIGINT))
    except (TrainingDiverged, OutOfMemory, WandbUnavailable, CausalityError) as exc:  # not the input: exit 1
        _fail(f"run failed: {exc}", 1)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports the run
        return
    s = result.summary
    click.echo(
        f"val/loss {s['val/loss']:.4f} (unigram baseline {s['unigram_loss']:.4f}), "
        f"val/accuracy {s['val/accuracy']:.4f}, {s['perf/tokens_per_s']:.0f} tokens/s"
    )
    mfu = f"MFU {s['perf/mfu']:.1%}" if s.get("perf/mfu") is not None else "MFU n/a"
    cost = f"cost ${s['cost/usd']:.4f}" if s.get("cost/usd") is not None else "cost n/a (no price for this device)"
    click.echo(f"{mfu}, {cost}")
    setup = {name: s.get(f"time/setup/{key}_s") for key, name in SETUP_STAGES.items()}
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in setup.items() if seconds is not None)
    click.echo(
        f"{sum(v or 0 for v in setup.values()):.1f} s before training ({parts}), {s['time/train_s']:.1f} s training"
    )
    click.echo(f"run record: {result.run_dir}")
    if result.wandb_dir:
        click.echo(f"W&B {result.wandb_mode} run: {result.wandb_dir}")
        if result.wandb_mode == "offline":  # a resumed run has one offline-run-* per attempt, synced in order
            wandb_id = Path(result.wandb_dir).name.split("-", 3)[3]  # offline-run-<time>-<id>
            folder = shlex.quote(str(Path(result.wandb_dir).parent))  # (a runs root with spaces pastes as one)
            click.echo(f"  upload later with: wandb sync {folder}/offline-run-*-{wandb_id}")


@main.command(context_settings=PASS_THROUGH)
@click.argument("spec_path", metavar="SPEC.json")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--overrides", "override_files", multiple=True, metavar="FILE")
@click.option("--print", "print_spec", is_flag=True, help="Print the full validated spec.")
def validate(spec_path, overrides, override_files, print_spec):
    """Validate SPEC.json (and overrides) without running: the spec, and its data inputs as a run checks them."""
    spec = _load(spec_path, overrides, override_files)
    _check_data_inputs(spec_path, spec)
    if print_spec:
        click.echo(json.dumps(spec.to_json_dict(), indent=2))
    click.echo(f"ok: {spec_path} -> run '{spec.run_name}' ({spec.model.label}), spec hash {spec.spec_hash()[:12]}")


@main.command()
def schema():
    """Print the run spec's JSON Schema."""
    click.echo(json.dumps(RunSpec.model_json_schema(), indent=2))


@main.command()
@click.option("--runs-root", default="runs", show_default=True, help="Local run records to report on.")
@click.option("--source", type=click.Choice(["local", "wandb"]), default="local", show_default=True)
@click.option("--entity", help="W&B entity (for --source wandb and --publish).")
@click.option("--project", help="W&B project (for --source wandb; --publish defaults to the runs' project).")
@click.option("--group", help="Only runs of this W&B group (by default a run's group is its experiment).")
@click.option("--sweep", help="Only runs of this sweep (id or name).")
@click.option("--tag", "tags", multiple=True, help="Only runs with this tag; may repeat (all must match).")
@click.option("--out", default="reports", show_default=True, help="Output directory (cache in OUT/cache).")
@click.option(
    "--gpu-prices", metavar="JSON|FILE", help="GPU $/h table, e.g. '{\"RTX 4090\": 0.4}' (or $BLUEBERRY_GPU_PRICES)."
)
@click.option("--readme", metavar="FILE", help="Also write the timeline into FILE between its timeline markers.")
@click.option("--publish", is_flag=True, help="Also build and save a W&B Report (needs the network).")
@click.option("--show", "show", multiple=True, metavar="EXPERIMENT", help="Also print this experiment's tables.")
def report(runs_root, source, entity, project, group, sweep, tags, out, gpu_prices, readme, publish, show):
    """Rebuild the study's tables, plots, timeline and dashboard from recorded runs."""
    from blueberry.report.build import run_report
    from blueberry.report.records import ReportError

    try:
        built = run_report(
            source=source,
            runs_root=runs_root,
            entity=entity,
            project=project,
            group=group,
            sweep=sweep,
            tags=tuple(tags),
            out=out,
            gpu_prices=gpu_prices,
            readme=readme,
            publish=publish,
            log=lambda msg: click.echo(msg, err=True),
        )
    except ReportError as exc:
        _fail(str(exc), exc.code)
    for name in show:
        section = built.sections.get(name)
        text = section or f"(no runs of experiment {name!r}{_close_to(name, sorted(built.sections))})"
        click.echo("\n".join(line for line in text.splitlines() if not line.startswith("![")))


@main.command()
@click.argument("sweep_path", metavar="SWEEP.yaml")
@click.option("--count", type=click.IntRange(min=1), help="Most trials in this sweep, across resumes.")
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Trials at once (one GPU each when GPUs exist).",
)
@click.option("--runs-root", default="runs", show_default=True, help="Where run records and sweep state go.")
@click.option("--dry-run", is_flag=True, help="Print the planned runs and their command lines; run nothing.")
def sweep(sweep_path, count, parallel, runs_root, dry_run):
    """Run a W&B sweep YAML offline with W&B's own sweep engine; the same command resumes it."""
    _refuse_torchrun(
        "sweep",
        "a trial's own command (the sweep file's `command:`) may start torchrun, and --parallel N runs N "
        "trials at once",
    )
    from blueberry.sweep import UNTIL_STOPPED, SweepRunner, load_sweep, open_ended, plan
    from blueberry.sweep.validate import check_trials
    from blueberry.tracking.preflight import PreflightError, check_environment, check_writable_dir

    try:
        swept = load_sweep(sweep_path)
        planned = plan(swept, count)
        check_trials(swept, planned)  # every planned run is a valid spec before any runs
        check_writable_dir(runs_root, "--runs-root")
        check_environment()
    except SpecError as exc:
        _fail(exc.render())
    except PreflightError as exc:
        _fail(str(exc))
    if dry_run:
        from blueberry.sweep.validate import describe

        click.echo(describe(swept, planned, open_ended(swept, count)))
        return
    runs = UNTIL_STOPPED if open_ended(swept, count) else f"{len(planned)} planned run(s)"
    click.echo(
        f"sweep {swept.sweep_id} ({swept.method}): {runs}; state in {runs_root}/_sweeps/{swept.sweep_id}", err=True
    )
    from blueberry.sweep.state import FAILED, SweepStateError

    try:
        runner = SweepRunner(swept, runs_root, count=count, parallel=parallel, log=lambda m: click.echo(m, err=True))
        state = runner.run()
    except SweepStateError as exc:
        _fail(f"{exc}: move it aside to start the sweep afresh")
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (terminal.StopSignal)
        _fail("sweep interrupted; run the same command again to resume", 128 + getattr(exc, "signum", signal.SIGINT))
    done = [t for t in state.trials if t.state == "finished"]
    failed = [t for t in state.trials if t.state != "finished"]
    click.echo(f"sweep {swept.sweep_id}: {len(done)} finished, {len(failed)} failed or stopped")
    for trial in failed:
        click.echo(f"  {trial.run_id}: {trial.state}: {trial.reason}")
    for _, why in state.unreadable:
        click.echo(f"  unreadable entry in the sweep state (not run): {why}")
    if any(t.state in FAILED for t in state.trials):  # as `study`: make, CI and scripts see it
        sys.exit(1)


@main.command(context_settings=PASS_THROUGH)
@click.argument("args", metavar="[SPEC.json] [OVERRIDES...]", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(args, as_json):
    """Show the hardware found (NVML GPUs, CPU) and what a run of SPEC.json (else the built-in defaults) would pick."""
    spec_path = args[0] if args and (args[0].endswith(".json") or Path(args[0]).is_file()) else None
    spec = _load(spec_path, args[1:] if spec_path else args, ())
    import torch

    from blueberry.distributed import env_world
    from blueberry.hardware import NotRunnableHere, detect, resolve_device
    from blueberry.plan import build, format_doctor
    from blueberry.tracking.preflight import PreflightError, check_price_variables, check_torchrun_variables

    info = detect(ask_cuda=True)  # CUDA's numbering of the GPUs; the plan below uses CUDA anyway
    try:
        check_price_variables()  # as a run refuses them
        check_torchrun_variables()
    except PreflightError as exc:
        _fail(str(exc))
    try:
        device = resolve_device(spec.train.device)
        # the spec's vocabulary size stands in for the tokenizer's: no data is prepared to answer
        plan = build(spec, device, spec.data.vocab_size, env_world().size, check_causal=False, probe=False).plan
    except NotRunnableHere as exc:
        _fail(f"{spec_path or 'the built-in defaults'}: {exc}")
    from blueberry import study
    from blueberry.tracking.wandb_settings import format_wandb_status, wandb_status

    try:
        wandb = wandb_status(spec)
    except ValueError as exc:  # a W&B variable W&B rejects: every run would fail on it
        _fail(str(exc))
    runs = study.describe(study.kind_of_machine(torch.cuda.is_available()))
    if as_json:
        found = {"hardware": info.to_dict(), "plan": plan.header(), "torch": torch.__version__, "wandb": wandb}
        click.echo(json.dumps({**found, "study": runs}, indent=2))
    else:
        click.echo(format_doctor(info, plan, spec_path or "the built-in defaults (no SPEC.json given)"))
        click.echo(format_wandb_status(wandb))
        from blueberry.provenance import checkout_with

        where = "" if checkout_with("sweeps") else "in a Blueberry checkout (this install has no sweeps/), "
        study_line = f"make run on this machine ({runs['kind']}): {runs['make_run']}; make study: {runs['make_study']}"
        click.echo(where + study_line)


def _need_checkout(command: str, *folders: str) -> None:
    """Exit 2 unless blueberry runs from a checkout holding `folders`: these commands measure its specs."""
    from blueberry.provenance import SOURCE_TREE, checkout_with

    if checkout_with(*folders) is None:
        _fail(
            f"{command} measures the specs in a Blueberry checkout's {' and '.join(f + '/' for f in folders)}, "
            f"which {SOURCE_TREE} (where the package is installed) does not hold: install it from a clone "
            "with `pip install -e .` (or `make install`)"
        )


@main.command()
@click.option("--ceiling", is_flag=True, help="Only measure (and cache) this CPU's fp32/bf16 GEMM ceilings.")
@click.option("--quick", is_flag=True, help="Tiny shapes, few cases: checks the bench works, measures little.")
@click.option("--out", default="reports/bench", show_default=True, help="Where the JSON and table go.")
@click.option(
    "--against",
    metavar="REV",
    help="Instead: the study's 512d dense and MoE steps at git revision REV against this tree, interleaved.",
)
@click.option(
    "--spec",
    "specs",
    multiple=True,
    metavar="SPEC.json",
    help="With --against: the spec files to compare, relative to the checkout (repeatable).",
)
@click.option("--rounds", type=click.IntRange(1), help="With --against: interleaved pairs [default: 3].")
def bench(ceiling, quick, out, against, specs, rounds):
    """Measure tokens/s, MFU and memory per variant, the speed ratios and the speed targets; print one table.
    With --against REV: how much faster (or slower) this tree trains than revision REV, measured interleaved."""
    if against is not None and not against.strip():
        _fail("--against needs a git revision (a branch, tag or commit), not an empty one")
    if against and (ceiling or quick):
        _fail("--against measures two versions of the study's steps; it does not combine with --ceiling or --quick")
    if not against and (specs or rounds):
        _fail("--spec and --rounds choose what --against compares; give --against REV with them")
    _check_out(out)
    if ceiling:
        from blueberry.bench.suite import measure_ceilings
        from blueberry.perf import ceiling_cache_path

        for precision, flops in measure_ceilings(quick).items():
            click.echo(f"{precision} GEMM ceiling: {flops / 1e12:.3f} TFLOP/s")
        if not quick:
            click.echo(f"cached in {ceiling_cache_path()} (runs use it for perf/mfu)")
        return
    from blueberry.bench.compare import DEFAULT_SPECS, CompareError, compare, format_comparison, save_comparison
    from blueberry.terminal import stop_signals_raise
    from blueberry.tracking.preflight import PreflightError, check_price_variables

    try:
        check_price_variables()  # every measurement's plan prices its device: a bad value failed each one
    except PreflightError as exc:
        _fail(str(exc))
    if not against:
        _need_checkout("blueberry bench", "experiments")
    from blueberry.bench import format_table, run_bench

    def log(message):
        click.echo(message, err=True)

    try:
        # `kill` stops it as Ctrl-C does: the checked-out worktree is removed, the background load's processes end
        with stop_signals_raise():
            if against:
                outcome = compare(against, specs or DEFAULT_SPECS, rounds or 3, log=log)
            else:
                outcome = run_bench(quick=quick, out_dir=out, log=log)
    except CompareError as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _fail("bench interrupted", 128 + getattr(exc, "signum", signal.SIGINT))
    if not against:
        click.echo(format_table(outcome))
        click.echo(f"saved: {outcome['saved']}")
        return
    click.echo(format_comparison(outcome))
    click.echo(f"saved: {save_comparison(outcome, out)}")
    unmeasured = [spec for spec, summary in outcome["summary"].items() if summary["speedup"] is None]
    if unmeasured:  # the table says why; a script must not read the comparison as done
        _fail(f"no round measured both versions of {', '.join(unmeasured)}", 1)


@main.command(context_settings=PASS_THROUGH)
@click.argument("args", metavar="SPEC.json [OVERRIDES...]", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--settle", default=4, show_default=True, type=click.IntRange(1, 1000), help="Steps before the one timed."
)
@click.option("--top", default=20, show_default=True, type=click.IntRange(1), help="Ops listed (slowest first).")
@click.option("--json", "as_json", is_flag=True, help="Print every op as JSON.")
def profile(args, settle, top, as_json):
    """Time one settled training step of SPEC.json op by op (synthetic tokens, the real trainer): where it goes."""
    if not args or args[0].startswith("--"):
        _fail("profile needs a run spec: blueberry profile SPEC.json [OVERRIDES...]")
    spec = _load(args[0], args[1:], ())
    import torch

    from blueberry.bench.step_profile import format_profile, profile_step
    from blueberry.hardware import NotRunnableHere
    from blueberry.threads import choose_threads
    from blueberry.tracking.preflight import PreflightError, check_price_variables

    torch.set_num_threads(choose_threads(spec.train.threads)[0])  # as a run chooses them
    try:
        check_price_variables()  # the plan prices the step's device
        result = profile_step(spec, settle)
    except PreflightError as exc:
        _fail(str(exc))
    except NotRunnableHere as exc:
        _fail(f"{args[0]}: {exc}")
    click.echo(json.dumps(result, indent=2) if as_json else format_profile(result, top))


@main.command(name="gpu-check")
@click.option("--out", help="Where the JSON and Markdown go (default: $OUT if set, else reports/gpu-check).")
@click.option("--only", "only", multiple=True, metavar="CHECK", help="Run only this check (repeatable).")
def gpu_check(out, only):
    """Prove and measure the CUDA path: speed per preset, memory, batch 'auto', a real run, resume, torchrun,
    and a projection of Experiment 1's cost. Needs a CUDA GPU; ≤ 8 minutes on an H100/H200-class one."""
    import os

    import torch

    setting = "$OUT" if not out and os.environ.get("OUT") else "--out"
    out = out or os.environ.get("OUT") or "reports/gpu-check"
    _check_out(out, setting)  # bad input first, GPU or not
    if only:
        from blueberry.gpu_check import CHECKS

        unknown = [name for name in only if name not in [check.name for check in CHECKS]]
        if unknown:
            _fail(f"unknown check {', '.join(unknown)}; the checks are: {', '.join(c.name for c in CHECKS)}")
    _need_checkout("blueberry gpu-check", "experiments", "sweeps")
    if not torch.cuda.is_available():
        from blueberry.hardware import detect_gpus

        _, why = detect_gpus()
        _fail(f"no CUDA GPU found (torch {torch.__version__}, NVML: {why}): gpu-check measures the CUDA path only", 2)
    from blueberry.gpu_check import CHECKS, run_gpu_check

    checks = [check for check in CHECKS if not only or check.name in only]
    outcomes, table, paths = run_gpu_check(
        torch.device("cuda"), out, checks=checks, log=lambda m: click.echo(m, err=True)
    )
    click.echo(table)
    click.echo(f"saved: {paths[0]} and {paths[1]}")
    if any(outcome.status == "failed" for outcome in outcomes):
        sys.exit(1)
