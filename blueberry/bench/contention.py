"""Step time under a controlled background load (called by `make bench`): no collapse when the cores are shared.

A fixed workload (the quickstart model's training step on synthetic tokens, through the real trainer) runs in a
fresh process for torch's default (a thread per core, OpenMP's default spinning) and for Blueberry's choice
(`blueberry.threads`: threads from the cores other processes leave free, a short spin), three times: on the
idle machine, with 2 × cores busy-loop processes started before it, and with the same load arriving after it
started (its threads already chosen on the idle machine; Blueberry's then follow the free cores, as a run's do:
`FreeCoresWatch`). The ratios loaded ÷ idle are what a sweep trial feels on a shared machine.

Against them, the floor a fair scheduler sets: with `load` busy processes, each of a run's `k` threads gets
cores ÷ (load + k) of a core, so no k-thread run does better than its idle k-thread step × (load + k) ÷ cores
(measured: Blueberry's idle step at the thread count it takes under the load).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from subprocess import PIPE

from blueberry.threads import usable_cores

POLICIES = ("torch default", "blueberry")
SETTLE_S = 1.0  # let the load reach the scheduler (and the sampler) before the timed steps

WORKER = """
import json, sys
policy, steps, path, overrides, load_arrives_later, threads = json.loads(sys.argv[1])
if policy == "blueberry":
    from blueberry.threads import limit_openmp_spinning
    limit_openmp_spinning()  # before torch loads OpenMP, as the CLI does
import torch
from blueberry.bench.measure import measure_throughput
from blueberry.overrides import load_spec
from blueberry.threads import FreeCoresWatch, choose_threads
callbacks = []
if policy == "blueberry":
    torch.set_num_threads(choose_threads(threads)[0])
    if threads is None:  # chosen, so they follow the free cores, as a run's do
        callbacks.append(FreeCoresWatch(torch.get_num_threads(), torch.set_num_threads))
spec = load_spec(path, overrides)
if load_arrives_later:
    measure_throughput(spec, warmup=1, repeats=1, callbacks=callbacks)  # OpenMP's threads start on the idle machine
    print("ready", flush=True)
    sys.stdin.readline()  # the load is on
r = measure_throughput(spec, warmup=2, repeats=steps, callbacks=callbacks)
print(json.dumps({"step_s": r["step_s"], "threads": torch.get_num_threads()}))
"""


def _spin(stop_at: float, parent: int) -> None:
    # Adopted by another process once the bench is gone, killed (even `kill -9`) without stopping its load:
    # the spinner then ends rather than loading the machine until `stop_at`.
    while time.time() < stop_at and os.getppid() == parent:
        pass


class _Load:
    """`n` busy-loop processes while the block runs."""

    def __init__(self, n: int):
        ctx = multiprocessing.get_context("spawn")
        # daemons: ended at the bench's exit even when it stops (Ctrl-C, `kill`) before the block is entered
        args = (time.time() + 900, os.getpid())
        self.spinners = [ctx.Process(target=_spin, args=args, daemon=True) for _ in range(n)]

    def __enter__(self):
        for p in self.spinners:
            p.start()
        time.sleep(SETTLE_S)

    def __exit__(self, *exc):
        for p in self.spinners:
            p.terminate()
        for p in self.spinners:
            p.join()


def _worker(
    policy: str,
    steps: int,
    spec_path: str,
    overrides: list[str],
    load: int = 0,
    later: bool = False,
    threads: int | None = None,
):
    """One measurement in a fresh process (threads and OpenMP's waiting are fixed when torch starts);
    `threads` fixes Blueberry's thread count instead of choosing it."""
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")  # each policy sets its own
    env = {k: v for k, v in os.environ.items() if k not in drop}
    args = [sys.executable, "-c", WORKER, json.dumps([policy, steps, spec_path, overrides, later, threads])]
    load_first = _Load(load) if load and not later else contextlib.nullcontext()
    with load_first:
        proc = subprocess.Popen(args, stdin=PIPE, stdout=PIPE, stderr=PIPE, text=True, env=env)
        try:
            if later and proc.stdout.readline().strip() == "ready":
                with _Load(load):
                    stdout, stderr = proc.communicate("\n", timeout=900)
            else:  # no load arriving later, or the worker failed before it was ready
                stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": "timed out"}
        except BaseException:  # interrupted (`kill` reaches the bench alone): the worker must not train on
            proc.kill()
            raise
    if proc.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(stdout.strip().splitlines()[-1])


def fair_share_floor(idle_s: float, idle_k_s: float, k: int, load: int, cores: int) -> float:
    """The lowest loaded ÷ idle step a fair scheduler allows a k-thread run beside `load` busy processes:
    each thread gets cores ÷ (load + k) of a core (all of one when the machine has a core per thread)."""
    return idle_k_s * max(1.0, (load + k) / cores) / idle_s


def measure_contention(spec_path: str, overrides: list[str], steps: int = 5, load_factor: int = 2) -> dict:
    """{policy: {"idle_s", "loaded_s", "ratio", "later_s", "later_ratio", "threads_*"}}, plus the load used;
    Blueberry's also has "floor", the fair scheduler's limit for the thread count it took under the load."""
    cores = usable_cores()
    load = load_factor * cores
    out: dict = {"load_processes": load, "cores": cores}
    for policy in POLICIES:
        idle = _worker(policy, steps, spec_path, overrides)
        loaded = _worker(policy, steps, spec_path, overrides, load=load)
        later = _worker(policy, steps, spec_path, overrides, load=load, later=True)
        failed = [r["error"] for r in (idle, loaded, later) if "error" in r]
        if failed:
            out[policy] = {"error": failed[0]}
            continue
        out[policy] = {
            "idle_s": idle["step_s"],
            "loaded_s": loaded["step_s"],
            "ratio": loaded["step_s"] / idle["step_s"],
            "later_s": later["step_s"],
            "later_ratio": later["step_s"] / idle["step_s"],
            "threads_idle": idle["threads"],
            "threads_loaded": loaded["threads"],
            "threads_later": later["threads"],
        }
        if policy == "blueberry":
            k = loaded["threads"]
            same = idle if k == idle["threads"] else _worker(policy, steps, spec_path, overrides, threads=k)
            if "error" not in same:
                out[policy]["floor"] = fair_share_floor(idle["step_s"], same["step_s"], k, load, cores)
                out[policy]["idle_threads_loaded_s"] = same["step_s"]
    return out
