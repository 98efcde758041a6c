"""How many CPU threads a run uses, chosen from the cores other processes leave free.

torch defaults to one OpenMP thread per core, and OpenMP's waiting threads spin. On a shared machine that
collapses: when another process keeps a core busy, every parallel region waits at its barrier for the thread
that lost its core while the others burn their time slices spinning. Measured on the 2-core dev machine with
four busy processes (quickstart model, tiny shape): 1.47 s per step with two threads, 0.11 s with one.
Sleeping waiters (OMP_WAIT_POLICY=PASSIVE) avoid the collapse too (0.036 s), but cost 2.4x (tiny shape) and
1.3x (quickstart) on the idle machine, so the fix here is the thread count. `make bench` measures it (its
contention rows).

Leaf module: standard library only.
"""

from __future__ import annotations

import os
import time

SAMPLE_S = 0.25  # long enough to see a busy neighbour, short next to any run


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks over all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cores_elsewhere(sample_s: float = SAMPLE_S) -> float | None:
    """Cores' worth of CPU other processes used over `sample_s` seconds (None where /proc/stat is missing)."""
    try:
        busy0, total0 = _busy_jiffies()
        own0 = time.process_time()
        time.sleep(sample_s)
        busy1, total1 = _busy_jiffies()
        own1 = time.process_time()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cpus = os.cpu_count() or 1
    busy = (busy1 - busy0) / (total1 - total0) * cpus  # in cores
    return max(0.0, busy - (own1 - own0) / sample_s)


def choose_threads(requested: int | None = None, environ: dict | None = None) -> tuple[int, str]:
    """(threads, why): the spec's `train.threads`, else OMP_NUM_THREADS (set by the user or by `blueberry sweep
    --parallel`), else the usable cores not kept busy by other processes, at least one."""
    environ = os.environ if environ is None else environ
    if requested:
        return requested, "train.threads"
    from_env = environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    cores = usable_cores()
    busy = busy_cores_elsewhere()
    if busy is None:
        return cores, f"{cores} usable cores"
    free = max(1, min(cores, round(cores - busy)))
    return free, f"{cores} usable cores, {busy:.1f} busy with other processes"
