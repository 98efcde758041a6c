"""Step time under a controlled background load (called by `make bench`): no collapse when the cores are shared.

A fixed workload (the quickstart model's training step on synthetic tokens, through the real trainer) runs in a
fresh process, once on the idle machine and once while 2 × cores busy-loop processes compete for the cores, for
torch's default (a thread per core) and for Blueberry's choice (`blueberry.threads`: threads from the cores
other processes leave free). The ratio
loaded ÷ idle is what a sweep trial feels on a shared machine.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

from blueberry.threads import usable_cores

POLICIES = ("torch default", "blueberry")


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def _worker(policy: str, steps: int, spec_path: str, overrides: list[str]) -> dict:
    """One measurement in a fresh process (threads and OpenMP's waiting are fixed when torch starts)."""
    code = (
        "import json, sys, torch\n"
        "from blueberry.bench.measure import measure_throughput\n"
        "from blueberry.overrides import load_spec\n"
        "from blueberry.threads import choose_threads\n"
        "policy, steps, path, overrides = json.loads(sys.argv[1])\n"
        "if policy == 'blueberry':\n"
        "    torch.set_num_threads(choose_threads()[0])\n"
        "r = measure_throughput(load_spec(path, overrides), warmup=2, repeats=steps)\n"
        "print(json.dumps({'step_s': r['step_s'], 'threads': torch.get_num_threads()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = json.dumps([policy, steps, spec_path, overrides])
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_contention(spec_path: str, overrides: list[str], steps: int = 5, load_factor: int = 2) -> dict:
    """{policy: {"idle_s", "loaded_s", "ratio", "threads_idle", "threads_loaded"}}, plus the load used."""
    cores = usable_cores()
    out: dict = {"load_processes": load_factor * cores, "cores": cores}
    for policy in POLICIES:
        idle = _worker(policy, steps, spec_path, overrides)
        ctx = multiprocessing.get_context("spawn")
        spinners = [ctx.Process(target=_spin, args=(time.time() + 900,)) for _ in range(load_factor * cores)]
        for p in spinners:
            p.start()
        try:
            time.sleep(1.0)  # let the load reach the scheduler (and the sampler) before the worker starts
            loaded = _worker(policy, steps, spec_path, overrides)
        finally:
            for p in spinners:
                p.terminate()
            for p in spinners:
                p.join()
        if "error" in idle or "error" in loaded:
            out[policy] = {"error": idle.get("error") or loaded.get("error")}
            continue
        out[policy] = {
            "idle_s": idle["step_s"],
            "loaded_s": loaded["step_s"],
            "ratio": loaded["step_s"] / idle["step_s"],
            "threads_idle": idle["threads"],
            "threads_loaded": loaded["threads"],
        }
    return out
