"""Checks that launch real `blueberry run` processes: a run with W&B offline and GPU telemetry, kill -9 and
resume against an uninterrupted run, and torchrun (a run, and an NCCL all-reduce). Each process lives in its own
session, so a time box ends it and all its children."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from blueberry.gpu_check.projection import REPO, read_experiment
from blueberry.gpu_check.suite import CheckFailed, Context
from blueberry.hardware import mig_slice
from blueberry.runner import SETUP_STAGES
from blueberry.tracking import read_metrics

QUICKSTART = str(REPO / "experiments" / "quickstart.json")
# Deterministic kernels where torch has them (warn_only: index_add's CUDA backward has none), then the CLI.
DETERMINISTIC_CLI = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from blueberry.cli import console_main; sys.argv[0] = 'blueberry'; console_main()"
)
REPRODUCIBLE = ("train/loss", "train/aux_loss", "train/grad_norm", "val/loss", "val/accuracy")
RESUME_TOLERANCE = 1e-3  # relative, on every logged loss and grad norm (bf16 on a GPU; CPU fp32 is bit-exact)


def child_env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    wandb = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # no WANDB_DIR: W&B's files in each run's record
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}
    return {**env, **wandb, "PYTHONPATH": path, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def run_process(argv: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `argv` to its end, or kill its whole session at `timeout_s` (CheckFailed)."""
    process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise CheckFailed(f"timed out after {timeout_s:.0f} s: {' '.join(argv[-6:])}") from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _expect_success(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise CheckFailed(f"{what} exited {done.returncode}: {done.stderr.strip()[-600:]}")


def run_dirs(root: Path) -> list[Path]:
    return sorted(path.parent for path in root.glob("*/*/spec.json"))


def telemetry(run_dir: Path) -> dict:
    """What a run recorded about the GPU and its cost: rows with gpu/* keys, and the summary's energy and cost."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    if not isinstance(summary, dict):
        raise CheckFailed(f"{run_dir / 'summary.json'} holds a JSON {type(summary).__name__}, not an object")
    gpu_rows = [row for row in rows if any(key.startswith("gpu/") for key in row)]
    return {
        "metric_rows": len(rows),
        "gpu_rows": len(gpu_rows),
        "gpu_keys": sorted({key for row in gpu_rows for key in row if key.startswith("gpu/")}),
        "energy_wh": summary.get("gpu/energy_wh"),
        "cost_usd": summary.get("cost/usd"),
        "train_s": summary.get("time/train_s"),
        "tokens_per_s": summary.get("perf/tokens_per_s"),
        "tokens": summary.get("trainer/tokens"),
        "setup_s": {stage: summary.get(f"time/setup/{stage}_s") for stage in SETUP_STAGES},
    }


def slowest_imports(stderr: str, n: int = 5) -> list[tuple[str, float]]:
    """The `n` packages whose modules took longest to import, in seconds, from Python's `-X importtime` lines
    (`import time: self [us] | cumulative | module`): each module's own time added up by its top-level package,
    so the figures do not overlap, and modules a package loads lazily later count too."""
    seconds: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        own, _, module = line.removeprefix("import time:").split("|")
        if own.strip().isdigit() and module.strip():
            package = module.strip().split(".")[0]
            seconds[package] = seconds.get(package, 0.0) + int(own) / 1e6
    return sorted(seconds.items(), key=lambda item: -item[1])[:n]


def without_bytecode_cache(packages: list[str]) -> list[str]:
    """Of `packages`, those whose top module has no cached bytecode beside its source (`__pycache__/*.pyc`, or
    under `sys.pycache_prefix`): Python compiles them from source on every import, as under
    PYTHONDONTWRITEBYTECODE=1 with packages installed without their .pyc (`pip install --no-compile`)."""
    missing = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a module that cannot be found from here, or one without a spec
            continue
        if spec and spec.origin and spec.origin.endswith(".py"):
            if not Path(importlib.util.cache_from_source(spec.origin)).exists():
                missing.append(name)
    return missing


def check_blueberry_run(context: Context, box_s: float) -> dict:
    """`blueberry run` of Experiment 1's dense preset, cut short, W&B offline: telemetry rows, energy, cost, and
    where its start-up went (the import times Python's `-X importtime` prints)."""
    experiment = read_experiment()
    root = context.work_dir / "run"
    (_, first_run), *_ = experiment.presets  # the sweep's own overrides, then the dense preset's variant
    argv = [sys.executable, "-X", "importtime", "-m", "blueberry", "run", experiment.base_spec, *first_run]
    argv += ["--model.variant=mlp"]
    argv += ["--train.steps=30", "--train.grad_accum=1", "--train.log_every=5", "--train.eval_every=30"]
    argv += ["--train.progress=false", "--tracking.wandb=offline", f"--tracking.runs_root={root}"]
    argv += [f"--train.device={context.device.type}", *context.run_shape]
    started = time.monotonic()
    done = run_process(argv, child_env(), box_s)
    wall = time.monotonic() - started
    _expect_success(done, "blueberry run")
    (run_dir,) = run_dirs(root)
    found = telemetry(run_dir)
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    # start-up per run for the projection: all but the steady training time (process, data, compile, eval, W&B)
    startup = wall - found["tokens"] / found["tokens_per_s"]
    rows = [("run", f"{found['metric_rows']} metric rows in {wall:.0f} s, {len(wandb_runs)} W&B offline run(s)")]
    rows.append(("GPU telemetry", f"{found['gpu_rows']} rows with {', '.join(found['gpu_keys']) or 'no gpu/ keys'}"))
    energy = "n/a" if found["energy_wh"] is None else f"{found['energy_wh']:.3f} Wh"
    cost = "n/a" if found["cost_usd"] is None else f"${found['cost_usd']:.5f}"
    rows.append(("summary", f"energy {energy}, cost {cost}"))
    setup = found["setup_s"].items()
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in setup if isinstance(seconds, (int, float)))
    rows.append(("before training (s)", stages or "not recorded"))
    imports = slowest_imports(done.stderr)
    rows.append(("slowest imports (s)", ", ".join(f"{name} {s:.1f}" for name, s in imports) or "not recorded"))
    uncached = without_bytecode_cache([name for name, _ in imports])
    caches = f"missing for {', '.join(uncached)}: every run compiles them from source" if uncached else "present"
    if uncached and sys.flags.dont_write_bytecode:
        caches += " (PYTHONDONTWRITEBYTECODE is set: none are written)"
    rows.append(("bytecode caches", caches))
    result = {"rows": rows, **found, "wall_s": wall, "startup_s": startup, "slowest_imports": imports,
              "without_bytecode_cache": uncached}  # fmt: skip
    problems = []
    # a MIG slice has no energy of its own: the board's power is spent by the other slices too (gpu_monitor.py)
    on_slice = context.device.type == "cuda" and mig_slice(torch.cuda.get_device_name(context.device)) is not None
    if context.device.type == "cuda" and (not found["gpu_rows"] or (found["energy_wh"] is None and not on_slice)):
        problems.append("no GPU telemetry rows or no energy in the summary")
    if context.device.type == "cuda" and found["cost_usd"] is None:
        problems.append("no cost in the summary")
    if not wandb_runs:
        problems.append("no W&B offline run")
    if problems:
        error = CheckFailed("; ".join(problems))
        error.figures = result
        raise error
    return result


def compare_records(reference: Path, resumed: Path) -> dict:
    """Largest relative difference of the reproducible metrics between two runs' rows, step by step."""

    def by_step(run_dir: Path) -> dict:
        return {(row["step"], "val/loss" in row): row for row in read_metrics(run_dir / "metrics.jsonl")}

    a, b = by_step(reference), by_step(resumed)
    if set(a) != set(b):
        return {"same_steps": False, "max_rel_diff": None, "weights_equal": False}
    worst = 0.0
    for key, row in a.items():
        for metric in REPRODUCIBLE:
            if metric in row:
                x, y = row[metric], b[key].get(metric)
                worst = max(worst, abs(x - y) / max(abs(x), 1e-12)) if y is not None else float("inf")
    digest = [json.loads((d / "summary.json").read_text()).get("weights/sha256") for d in (reference, resumed)]
    return {"same_steps": True, "max_rel_diff": worst, "weights_equal": digest[0] == digest[1]}


def _latest_checkpoint(root: Path) -> int:
    return max((int(p.stem.removeprefix("step-")) for p in root.glob("*/*/checkpoints/step-*.pt")), default=0)


def check_kill_resume(context: Context, box_s: float) -> dict:
    """An uninterrupted run, and the same run killed with SIGKILL after its first checkpoint and run again."""
    deadline = time.monotonic() + box_s
    argv = [sys.executable, "-c", DETERMINISTIC_CLI, "run", QUICKSTART, "--train.steps=30", "--train.log_every=5"]
    argv += ["--train.eval_every=15", "--train.checkpoint_every=10", "--train.progress=false", "--train.compile=false"]
    argv += ["--tracking.wandb=offline", f"--train.device={context.device.type}", *context.run_shape]
    env = child_env()
    reference_root, root = context.work_dir / "uninterrupted", context.work_dir / "killed"
    _expect_success(run_process([*argv, f"--tracking.runs_root={reference_root}"], env, box_s), "uninterrupted run")
    process = subprocess.Popen([*argv, f"--tracking.runs_root={root}"], env=env, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while _latest_checkpoint(root) < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_after = _latest_checkpoint(root)
    if process.poll() is not None or not killed_after:
        os.killpg(process.pid, signal.SIGKILL)
        raise CheckFailed(
            f"the run ended or timed out before a checkpoint could be killed: {process.communicate()[1][-400:]}"
        )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_process([*argv, f"--tracking.runs_root={root}"], env, deadline - time.monotonic())
    _expect_success(resumed, "resumed run")
    (reference,), (run_dir,) = run_dirs(reference_root), run_dirs(root)
    found = compare_records(reference, run_dir)
    resumes = json.loads((run_dir / "spec.json").read_text()).get("resumes", [])
    rows = [
        ("killed", f"SIGKILL after checkpoint {killed_after}; resumed from step {[r.get('step') for r in resumes]}")
    ]
    diff = found["max_rel_diff"]
    rows.append(("resumed vs uninterrupted", "different steps logged" if diff is None else
                 f"max relative difference {diff:.2e} (tolerance {RESUME_TOLERANCE:g}), "
                 f"weights {'identical' if found['weights_equal'] else 'differ'}"))  # fmt: skip
    result = {"rows": rows, **found, "killed_after_checkpoint": killed_after, "tolerance": RESUME_TOLERANCE}
    if diff is None or diff > RESUME_TOLERANCE or not resumes:
        error = CheckFailed("the resumed run does not match the uninterrupted one")
        error.figures = result
        raise error
    return result


def check_torchrun(context: Context, box_s: float) -> dict:
    """torchrun on every GPU here (one process on a one-GPU machine): an NCCL all-reduce, then a `blueberry run`."""
    deadline = time.monotonic() + box_s
    n = torch.cuda.device_count() if context.device.type == "cuda" else 2
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    env = child_env()
    probe = run_process([*launch, "-m", "blueberry.gpu_check.nccl_probe"], env, box_s)
    _expect_success(probe, "the all-reduce probe")
    reduced = json.loads(probe.stdout.strip().splitlines()[-1])
    root = context.work_dir / "torchrun"
    argv = [*launch, "-m", "blueberry", "run", QUICKSTART, "--train.steps=10", "--train.log_every=5"]
    argv += ["--train.eval_every=10", "--train.progress=false", "--train.compile=false", "--tracking.wandb=offline"]
    argv += [f"--train.device={context.device.type}", f"--tracking.runs_root={root}", *context.run_shape]
    _expect_success(run_process(argv, env, deadline - time.monotonic()), "torchrun blueberry run")
    (run_dir,) = run_dirs(root)
    header = json.loads((run_dir / "spec.json").read_text())
    world = header["hardware"]["world_size"]
    status = json.loads((run_dir / "status.json").read_text())["state"]
    rows = [("all-reduce", f"{reduced['backend']}, {reduced['world_size']} process(es), sum {reduced['sum']:g}")]
    rows.append(("blueberry run", f"{n} process(es), world size {world} in the record, {status}"))
    result = {"rows": rows, "probe": reduced, "world_size": world, "state": status, "processes": n}
    if not reduced["ok"] or world != n or status != "finished":
        error = CheckFailed("all-reduce sum wrong, world size not recorded, or the run did not finish")
        error.figures = result
        raise error
    return result
