"""The Blueberry report's study as data, and one command that runs all of it.

Each part is one W&B sweep file per kind of machine: the CPU twin (`sweeps/cpu/`, sized so the whole study
fits 90 minutes on two cores) and the study's own shape (`sweeps/`, for a CUDA GPU). `make run` runs the
quick part only (Experiment 1's twin on CPU, a time-boxed study-shape ablation on CUDA); `make study` runs
every part. Each part is an ordinary sweep, so the study resumes as sweeps do: run it again and every
finished trial is kept, an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from blueberry.fileio import exclusive_lock, is_number, read_json, write_text_atomic
from blueberry.sweep.progress import fmt_eta


@dataclass(frozen=True)
class Part:
    name: str
    cpu: str  # sweep file of the CPU twin
    cuda: str  # sweep file at the study's shape


PARTS = (
    Part("exp1", "sweeps/cpu/ablation.yaml", "sweeps/ablation.yaml"),
    Part("exp2", "sweeps/cpu/lr_attention_mlp.yaml", "sweeps/lr_attention_mlp.yaml"),
    Part("exp3", "sweeps/cpu/lr_attention_moe.yaml", "sweeps/lr_attention_moe.yaml"),
    Part("exp3-experts", "sweeps/cpu/experts_attention_moe.yaml", "sweeps/experts_attention_moe.yaml"),
    Part("extended", "sweeps/cpu/extended_attention_moe.yaml", "sweeps/extended_attention_moe.yaml"),
    Part("t4-lr", "sweeps/cpu/t4_lr_fine.yaml", "sweeps/t4/lr_fine.yaml"),
    Part("t4-schedule", "sweeps/cpu/t4_schedule.yaml", "sweeps/t4/schedule.yaml"),
    Part("t4-experts", "sweeps/cpu/t4_experts.yaml", "sweeps/t4/experts.yaml"),
    Part("t4-accum-dropout", "sweeps/cpu/t4_accum_dropout.yaml", "sweeps/t4/accum_dropout.yaml"),
)
# `make run`: Experiment 1 in miniature on CPU; on CUDA the study-shape ablation, time-boxed by its steps.
QUICK = Part("exp1", "sweeps/cpu/ablation.yaml", "sweeps/ablation_quick.yaml")
MAX_PARALLEL = 8  # CPU trials at once, at most (each holds its own model, data and W&B process)


def quick_is_the_studys(kind: str) -> bool:
    """Whether `--quick` runs the study's own sweep of its part on this kind of machine (on a CPU: make run's
    trials count towards make study, so its time goes in the study record too; on CUDA it is time-boxed)."""
    return getattr(QUICK, kind) == getattr(next(part for part in PARTS if part.name == QUICK.name), kind)


def kind_of_machine(cuda_available: bool) -> str:
    return "cuda" if cuda_available else "cpu"


def describe(kind: str) -> dict:
    """What `make run` and `make study` run on this kind of machine (for `blueberry doctor`)."""
    shape = "the study's shapes" if kind == "cuda" else "CPU twins (sweeps/cpu/)"
    return {
        "kind": kind,
        "make_run": getattr(QUICK, kind),
        "make_study": f"{len(PARTS)} parts at {shape}: " + ", ".join(p.name for p in PARTS),
    }


def plan_parts(quick: bool, only: tuple[str, ...] = ()) -> list[Part]:
    """The parts to run, in the study's order; `only` picks parts by name (unknown names are an error)."""
    if quick:
        if only:
            raise ValueError("--quick runs Experiment 1 in miniature: it takes no --only")
        return [QUICK]
    unknown = sorted(set(only) - {p.name for p in PARTS})
    if unknown:
        raise ValueError(f"unknown study part(s) {', '.join(unknown)}; the parts: {', '.join(p.name for p in PARTS)}")
    return [p for p in PARTS if not only or p.name in only]


def cpu_parallel(free_cores: float) -> int:
    """CPU trials at once: one per free core, one thread each. On 2 idle cores two 1-thread trials of the CPU
    twin did 1.36× the work of one 2-thread trial (measured; see README "Two commands"): small matrices
    scale poorly across threads, and each trial's start-up (imports, data, W&B) overlaps another's training."""
    return max(1, min(MAX_PARALLEL, int(free_cores + 0.5)))


class StudyProgress:
    """The study-wide head of the live progress line: trials done of all planned, and a study ETA from the
    mean wall time per trial this invocation (parts differ in trial length: the ETA settles as they finish)."""

    def __init__(self, total: int, done_before: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.done_before = total, done_before
        self.done_now = 0  # finished by this invocation in the parts before the current one
        self.clock = clock
        self.started = clock()

    def head_for(self, part: str) -> Callable[[int], str]:
        """The head for a part's sweep progress, given the trials that sweep has finished so far."""
        return lambda finished_in_part: self.head(part, self.done_now + finished_in_part)

    def part_finished(self, trials: int) -> None:
        self.done_now += trials

    def head(self, part: str, done_now: int) -> str:
        done = self.done_before + done_now
        per_trial = (self.clock() - self.started) / done_now if done_now else None
        eta = fmt_eta(per_trial * (self.total - done)) if per_trial is not None else "?"
        return f"study {done}/{self.total} trials, ETA {eta} · {part}"


@dataclass
class PartResult:
    part: Part
    sweep_file: str
    sweep_id: str
    planned: int
    finished: int
    failed: list[str]  # "run_id: state: reason"
    wall_s: float  # of this invocation
    recorded_s: float = 0.0  # of wall_s, what write_record has added to the study record so far


def load_parts(parts: list[Part], kind: str) -> list[tuple[Part, str, object, list[dict]]]:
    """(part, sweep file, Sweep, planned params) for each part; every planned trial is checked to be a valid
    run spec before anything runs (a SpecError names the file and field)."""
    from blueberry.overrides import SpecError
    from blueberry.sweep import load_sweep, plan
    from blueberry.sweep.config import INVALID
    from blueberry.sweep.validate import check_trials

    loaded = []
    for part in parts:
        path = getattr(part, kind)
        if not Path(path).is_file():  # the sweep files, and the specs their commands name, are the repo's
            where = f"not found in {Path.cwd()}; run `blueberry study` from the repository root"
            raise SpecError([(path, "", where)], INVALID)
        sweep = load_sweep(path)
        planned = plan(sweep, None)
        check_trials(sweep, planned)
        loaded.append((part, path, sweep, planned))
    return loaded


def run_study(
    loaded,
    runs_root: str,
    parallel: int,
    log: Callable[[str], None],
    results: list[PartResult] | None = None,
    part_ended: Callable[[], None] | None = None,
) -> list[PartResult]:
    """Run the parts' sweeps one after another under one study-wide progress line; each resumes its state.
    `results`, when given, is filled as each part ends, an interrupted one included (its time so far), so the
    caller can record them though the interruption propagates; `part_ended` is called after each part that ran to
    its end (to record it: a study killed later, SIGKILL, loses no finished part's time)."""
    from blueberry.sweep import SweepRunner
    from blueberry.sweep.state import FAILED, TERMINAL

    runners = [
        (part, path, SweepRunner(sweep, runs_root, parallel=parallel, log=log)) for part, path, sweep, _ in loaded
    ]

    def ended(runner) -> int:  # its trials that will run no more (finished, stopped, failed): done, as progress
        return sum(t.state in TERMINAL for t in runner.state.trials)

    done_before = sum(ended(runner) for *_, runner in runners)
    progress = StudyProgress(sum(len(planned) for *_, planned in loaded), done_before)
    results = [] if results is None else results
    for (part, path, runner), (*_, planned) in zip(runners, loaded):
        runner.progress.outer = progress.head_for(part.name)
        before, ended_before = sum(t.state == "finished" for t in runner.state.trials), ended(runner)
        log(f"study part {part.name}: {path} ({len(planned)} trials, {before} already finished)")
        started = time.monotonic()
        try:
            runner.run()
        finally:  # interrupted too: the part's time so far is part of the study's
            finished = sum(t.state == "finished" for t in runner.state.trials)
            failed = [f"{t.run_id}: {t.state}: {t.reason}" for t in runner.state.trials if t.state in FAILED]
            wall = time.monotonic() - started
            results.append(PartResult(part, path, runner.sweep.sweep_id, len(planned), finished, failed, wall))
        progress.part_finished(ended(runner) - ended_before)
        if part_ended is not None:
            part_ended()
    return results


def record_path(runs_root: str, kind: str) -> Path:
    return Path(runs_root) / "_study" / f"{kind}.json"


def read_record(runs_root: str, kind: str) -> dict:
    """The study record as it is now: {} where there is none or it cannot be read."""
    return read_json(record_path(runs_root, kind)) or {}


def write_record(
    results: list[PartResult], runs_root: str, kind: str, command: str, parallel: int, started: datetime
) -> Path:
    """<runs_root>/_study/<kind>.json: what ran, where and how long (a part's wall time summed over the
    invocations that ran the same sweep, interrupted ones included; a changed sweep file is a new sweep), for the
    report's provenance section. Parts this invocation did not run (`--only`) keep their entries. `started`: when
    this invocation began. Each write adds what of each part's time it has not added yet (`recorded_s`), to the
    record as it is on disk under a lock: an invocation writing after each part, and two invocations at once (one
    per part), each count their time once. Rewritten atomically."""
    path = record_path(runs_root, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_suffix(".lock")):
        return _write_record(path, read_record(runs_root, kind), results, kind, command, parallel, started)


def _write_record(path, previous, results, kind, command, parallel, started) -> Path:
    from blueberry import hardware, provenance

    found = previous.get("parts") if isinstance(previous.get("parts"), list) else []  # a record is read as found
    # the study's parts in its order (and any this invocation ran); an entry of a part no longer in it is dropped
    order = list(dict.fromkeys([part.name for part in PARTS] + [r.part.name for r in results]))
    kept = {p["name"]: p for p in found if isinstance(p, dict) and p.get("name") in order}
    walls = {(p.get("name"), p.get("sweep_id")): p["wall_s"] for p in kept.values() if is_number(p.get("wall_s"))}
    first = previous.get("started")  # the first invocation's start, if an earlier record kept it readable
    record = {
        "command": command,
        "kind": kind,
        "parallel": parallel,
        "code": provenance.code_version(),
        "machine": hardware.detect().to_dict(),
        "started": first if isinstance(first, str) else started.isoformat(timespec="seconds"),
        "ended": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for r in results:
        kept[r.part.name] = {
            "name": r.part.name,
            "sweep_file": r.sweep_file,
            "sweep_id": r.sweep_id,
            "planned": r.planned,
            "finished": r.finished,
            "failed": r.failed,
            "wall_s": round(walls.get((r.part.name, r.sweep_id), 0.0) + r.wall_s - r.recorded_s, 1),
        }
    record["parts"] = sorted(kept.values(), key=lambda p: order.index(p["name"]))
    record["wall_s"] = round(sum(p["wall_s"] for p in record["parts"] if is_number(p.get("wall_s"))), 1)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    for r in results:
        r.recorded_s = r.wall_s
    return path
