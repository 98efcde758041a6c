"""`blueberry bench --against REV`: the study's training step at another revision against this tree, interleaved.

A speed-up between two versions of the code is only worth quoting when both were measured on the same machine
under the same conditions; a 2-core machine's speed drifts by tens of per cent over minutes (other tenants, the
first runs after idle). So the two versions alternate, measurement by measurement, in the order A B B A A B …,
each in a fresh process (OpenMP's threads, the allocator and torch's caches start clean), and the speed-up is
taken within each round before the rounds are summarised.

The other revision is checked out with `git worktree` into a temporary directory and imported from there; both
versions run on this environment's libraries, the same precision (what `train.precision: auto` picks on this
hardware, passed to both) and as many threads as this process may use. Each version loads its own copy of the
spec file, so each runs the experiment as that revision defines it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from blueberry.fileio import write_results
from blueberry.overrides import SpecError, load_spec
from blueberry.provenance import SOURCE_TREE

# The study's 512d dense and MoE presets at its recipe (grad_accum 4): what the CPU-speed targets compare.
DEFAULT_SPECS = ("experiments/mlp_512d.json", "experiments/moe_8e_2k_512d.json")
VERSIONS = ("base", "current")

# One measurement, in a fresh process whose cwd and sys.path[0] are the version's tree. It uses only the two
# functions every revision since the bench began has (`load_spec`, `measure_throughput`).
WORKER = """
import json, sys
spec_path, overrides, threads, warmup, repeats = json.loads(sys.argv[1])
import torch
torch.set_num_threads(threads)
import blueberry
from blueberry.bench.measure import measure_throughput
from blueberry.overrides import load_spec
r = measure_throughput(load_spec(spec_path, overrides), warmup=warmup, repeats=repeats)
out = {"step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"], "precision": r["precision"]}
print(json.dumps({**out, "package": blueberry.__file__}))
"""


# What WORKER imports from a version's tree: each file and the function it must define there.
WORKER_NEEDS = {"blueberry/bench/measure.py": "measure_throughput", "blueberry/overrides.py": "load_spec"}


class CompareError(Exception):
    """The comparison cannot start: not a git checkout, an unknown revision, a spec file missing, a base revision
    without what the comparison runs."""


def _git(tree: Path, *args: str) -> str:
    """`git -C tree args`; its output, or CompareError with git's last line (resolve_revision checks git exists)."""
    done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CompareError(f"git {' '.join(args)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return done.stdout.strip()


def resolve_revision(tree: Path, revision: str) -> str:
    """The full commit `revision` names in the checkout at `tree` (CompareError if none)."""
    if shutil.which("git") is None:
        raise CompareError("--against needs git, which is not installed here")
    try:
        _git(tree, "rev-parse", "--git-dir")
    except CompareError as exc:
        raise CompareError(f"--against needs a git checkout of Blueberry; {tree} is not one") from exc
    try:
        return _git(tree, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except CompareError:
        raise CompareError(f"--against {revision!r}: no such revision in {tree}") from None


@contextlib.contextmanager
def checked_out(tree: Path, commit: str):
    """A detached worktree of `commit` in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="blueberry-against-") as parent:
        path = Path(parent) / commit[:12]
        _git(tree, "worktree", "add", "--detach", "--quiet", str(path), commit)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(tree), "worktree", "remove", "--force", str(path)], capture_output=True)


def check_base(base: Path, revision: str, specs: tuple[str, ...]) -> None:
    """CompareError unless the checked-out `base` holds what the comparison runs there: WORKER's functions and
    each spec file. Otherwise every base measurement fails, after this tree was timed for nothing in each round."""
    missing = [f"{name} in {path}" for path, name in WORKER_NEEDS.items() if f"def {name}(" not in _read(base / path)]
    missing += [spec for spec in specs if not (base / spec).is_file()]
    if missing:
        raise CompareError(f"--against {revision!r} cannot be measured: it has no {', '.join(missing)}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # absent (or no text): it defines nothing
        return ""


def measure_in(tree: Path, spec_path: str, overrides: list[str], threads: int, warmup: int, repeats: int) -> dict:
    """One measurement of `spec_path` (relative to `tree`) by the code in `tree`, in a fresh process."""
    path = [str(tree), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # before site-packages and an editable install
    args = [sys.executable, "-c", WORKER, json.dumps([spec_path, overrides, threads, warmup, repeats])]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return read_result((done.stdout.strip().splitlines() or [""])[-1], tree)


def read_result(line: str, tree: Path) -> dict:
    """The worker's last line as a measurement, or {"error": why} when it is not one (no JSON, not the worker's
    object, or Blueberry imported from outside `tree`, i.e. other code measured)."""
    try:
        result = json.loads(line)
    except ValueError:
        return {"error": "the measurement printed no result"}
    if not (
        isinstance(result, dict)
        and isinstance(result.get("package"), str)
        and isinstance(result.get("step_s"), (int, float))
        and result["step_s"] > 0
    ):
        return {"error": f"the measurement printed {line[:80]!r}, not a step time"}
    if not Path(result.pop("package")).resolve().is_relative_to(tree.resolve()):
        return {"error": f"imported blueberry from outside {tree}"}
    return result


def interleaved_order(rounds: int) -> list[tuple[int, str]]:
    """(round, version) in the order measured: A B, then B A, …, so neither version always goes first."""
    order = []
    for r in range(rounds):
        pair = VERSIONS if r % 2 == 0 else VERSIONS[::-1]
        order += [(r, version) for version in pair]
    return order


def summarise(rows: list[dict]) -> dict:
    """Per version the median step; the speed-up current over base per round (base step ÷ current step of
    the same round) and their median, min and max. Failed measurements are left out and counted."""
    ok = [row for row in rows if "step_s" in row]
    steps = {v: [row["step_s"] for row in ok if row["version"] == v] for v in VERSIONS}
    by_round = {}
    for row in ok:
        by_round.setdefault(row["round"], {})[row["version"]] = row["step_s"]
    speedups = [pair["base"] / pair["current"] for pair in by_round.values() if len(pair) == 2]
    return {
        **{f"{v}_step_s": statistics.median(steps[v]) if steps[v] else None for v in VERSIONS},
        "speedup": statistics.median(speedups) if speedups else None,
        "speedup_range": [min(speedups), max(speedups)] if speedups else None,
        "rounds": len(speedups),
        "failed": [row["error"] for row in rows if "error" in row],
    }


def compare(
    revision: str,
    specs: tuple[str, ...] = DEFAULT_SPECS,
    rounds: int = 3,
    warmup: int = 3,
    repeats: int = 3,
    tree: Path | None = None,
    measure: Callable[..., dict] = measure_in,
    log=print,
) -> dict:
    """Each spec's training step at `revision` (base) and in `tree` (current: this package's checkout),
    `rounds` interleaved pairs. Returns the raw rows and a summary per spec."""
    from blueberry.bench.suite import native_precision
    from blueberry.threads import usable_cores

    tree = Path(tree or SOURCE_TREE)
    commit = resolve_revision(tree, revision)
    missing = [spec for spec in specs if not (tree / spec).is_file()]
    if missing:
        raise CompareError(f"no spec file {', '.join(missing)} in {tree}")
    precision, threads = native_precision(), usable_cores()
    overrides = [f"--train.precision={precision}"]
    for spec in specs:  # a spec this tree cannot read would fail every round, after the base is checked out
        try:
            load_spec(tree / spec, overrides)
        except SpecError as exc:
            raise CompareError(exc.render()) from None
    what = f"{len(specs)} spec(s) × {rounds} round(s), {precision}, {threads} threads"
    log(f"{revision} ({commit[:12]}) against {tree}: {what}")
    started, load_before = time.time(), os.getloadavg()[0]
    rows = []
    with checked_out(tree, commit) as base_tree:
        check_base(base_tree, revision, specs)
        trees = {"base": base_tree, "current": tree}
        for spec in specs:
            for r, version in interleaved_order(rounds):
                row = {"spec": spec, "round": r, "version": version, "load": os.getloadavg()[0]}
                row.update(measure(trees[version], spec, overrides, threads, warmup, repeats))
                rows.append(row)
                shown = f"{row['step_s']:.3f} s a step" if "step_s" in row else f"failed: {row['error']}"
                log(f"  {spec} round {r + 1}/{rounds} {version}: {shown} (load {row['load']:.1f})")
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "against": {"revision": revision, "commit": commit},
        "tree": str(tree),
        "precision": precision,
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "rows": rows,
        "summary": {spec: summarise([row for row in rows if row["spec"] == spec]) for spec in specs},
        "load_average": [load_before, os.getloadavg()[0]],
        "compare_s": time.time() - started,
    }


def format_comparison(outcome: dict) -> str:
    """The summary as a Markdown table, with what was compared and the load around it."""
    against = outcome["against"]
    load = outcome["load_average"]
    lines = [
        f"`{against['revision']}` ({against['commit'][:12]}) = base against this tree = current; "
        f"{outcome['precision']}, {outcome['threads']} threads, median of {outcome['repeats']} steps after "
        f"{outcome['warmup']} per measurement; load average {load[0]:.1f} before, {load[1]:.1f} after",
        "",
        "| spec | base s/step | current s/step | speed-up (median of rounds) | range | rounds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for spec, s in outcome["summary"].items():
        if s["speedup"] is None:
            lines.append(f"| {spec} | — | — | — | failed: {'; '.join(s['failed'][:2]) or 'no pair'} | 0 |")
            continue
        low, high = s["speedup_range"]
        lines.append(
            f"| {spec} | {s['base_step_s']:.3f} | {s['current_step_s']:.3f} | {s['speedup']:.2f}× "
            f"| {low:.2f}–{high:.2f}× | {s['rounds']} |"
        )
    return "\n".join(lines)


def save_comparison(outcome: dict, out_dir: str | Path) -> Path:
    """`compare-<date>.{json,md}` under `out_dir`; the JSON's path."""
    return write_results(out_dir, f"compare-{time.strftime('%Y%m%d-%H%M%S')}", outcome, format_comparison(outcome))
