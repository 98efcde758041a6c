"""How many CPU threads a run uses, chosen from the cores other processes leave free, and how long they spin.

torch defaults to one OpenMP thread per core, and OpenMP's waiting threads spin. On a shared machine that
collapses: when another process keeps a core busy, every parallel region waits at its barrier for the thread
that lost its core while the others burn their time slices spinning. Two remedies, both measured by
`make bench` (its contention rows) on a 2-core AVX2 EPYC with four busy-loop processes, quickstart model:

- threads from the cores free when the run starts (`choose_threads`): one thread under that load;
- a short spin before a waiting thread sleeps (`limit_openmp_spinning`): GNU OpenMP spins 300,000 times by
  default; after 3,000 the idle step time is unchanged (0.230 s against 0.22-0.24 s) and two threads under the
  load take 0.93 s a step, as one thread does (0.86-0.95 s), instead of 2.7-5 s. It is what keeps a run that
  started on an idle machine from collapsing when the load arrives later. OMP_WAIT_POLICY=PASSIVE (no spin at
  all) costs 1.3x on the idle machine.

Under that load no choice does better than about 4x the idle step: four busy processes and ours share two cores
fairly, which leaves a one-thread run 0.4 of a core against the ~1.6 cores' worth two threads give when idle.

A run keeps looking (`FreeCoresWatch`, after each optimizer step): when other processes take cores after it
started, or give them back, it sets the thread count a run started then would have chosen.

Leaf module: standard library only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

SAMPLE_S = 0.25  # long enough to see a busy neighbour, short next to any run
RECHECK_S = 1.0  # a training run looks at what its neighbours use at most once in this many seconds
THREADS_MARGIN = 0.75  # cores by which the free ones must differ from a run's threads before they change
OPENMP_SPIN_COUNT = "3000"  # GNU OpenMP's GOMP_SPINCOUNT; its default is 300,000 (see above)


def limit_openmp_spinning(environ: dict | None = None) -> bool:
    """Set GOMP_SPINCOUNT for this process and its children unless the user chose OpenMP's waiting.

    GNU OpenMP reads it once, when torch loads it: call this before `import torch`. Returns whether it set it.
    """
    environ = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True


def cpu_set() -> set[int]:
    """The CPUs this process may run on (its affinity: taskset, a container's cpuset, a SLURM allocation)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(membership: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """Cores' worth of CPU time this process's cgroup (v2) and its parents allow (`docker --cpus`, Kubernetes
    CPU limits), or None: no limit, or no cgroup v2."""
    try:
        with open(membership, encoding="ascii") as handle:
            own = next(line[3:].strip() for line in handle if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    root = Path(root)
    folder, limits = root / own.lstrip("/"), []
    for path in (folder, *folder.parents):
        if not path.is_relative_to(root):
            break
        try:
            quota, period = (path / "cpu.max").read_text(encoding="ascii").split()
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    return min(limits, default=None)


def usable_cores() -> int:
    """Cores this process may use: its CPUs, capped by its cgroup's CPU limit (rounded up), at least one."""
    cores, limit = len(cpu_set()), cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else max(1, cores)


def busy_jiffies(cpus: set[int], stat: str = "/proc/stat") -> tuple[int, int]:
    """(busy, total) clock ticks since boot summed over `cpus`, from their `cpuN` lines of /proc/stat."""
    busy = total = 0
    with open(stat, encoding="ascii") as handle:
        for line in handle:
            name, *values = line.split()
            if not name.startswith("cpu"):
                break  # the per-CPU lines come first
            if name == "cpu" or int(name[3:]) not in cpus:
                continue
            fields = [int(v) for v in values[:8]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy, total = busy + sum(fields) - idle, total + sum(fields)
    return busy, total


# What reading /proc/stat raises where it is missing (not Linux) or not as Linux writes it
STAT_UNREADABLE = (OSError, ValueError, IndexError)


def cpu_sample(cpus: set[int], stat: str = "/proc/stat") -> tuple[float, float, int, int]:
    """(wall clock, this process's CPU time, busy and total ticks of `cpus`): two give `busy_between`."""
    return time.monotonic(), time.process_time(), *busy_jiffies(cpus, stat)


def busy_between(first: tuple, second: tuple, n_cpus: int) -> float | None:
    """Cores' worth of CPU other processes used on `n_cpus` CPUs between two `cpu_sample`s (None: no ticks)."""
    (wall0, own0, busy0, total0), (wall1, own1, busy1, total1) = first, second
    if total1 <= total0 or wall1 <= wall0:
        return None
    busy = (busy1 - busy0) / (total1 - total0) * n_cpus  # in cores
    return max(0.0, busy - (own1 - own0) / (wall1 - wall0))


def busy_cores_elsewhere(sample_s: float = SAMPLE_S) -> float | None:
    """Cores' worth of CPU other processes used on this process's CPUs over `sample_s` seconds (None where
    /proc/stat is missing)."""
    cpus = cpu_set()
    try:
        first = cpu_sample(cpus)
        time.sleep(sample_s)
        return busy_between(first, cpu_sample(cpus), len(cpus))
    except STAT_UNREADABLE:
        return None


def pinned_threads(requested: int | None = None, environ: dict | None = None) -> tuple[int, str] | None:
    """(threads, why) where the user fixed them: the spec's `train.threads`, else OMP_NUM_THREADS (set by the
    user or by `blueberry sweep --parallel`); None: Blueberry chooses them."""
    environ = os.environ if environ is None else environ
    if requested:
        return requested, "train.threads"
    from_env = environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    return None


def choose_threads(requested: int | None = None, environ: dict | None = None) -> tuple[int, str]:
    """(threads, why): `pinned_threads`, else this process's CPUs not kept busy by other processes, within its
    cgroup's CPU limit, at least one."""
    pinned = pinned_threads(requested, environ)
    if pinned:
        return pinned
    cores = usable_cores()
    busy = busy_cores_elsewhere()
    if busy is None:
        return cores, f"{cores} usable cores"
    return max(1, round(free_cores(busy))), f"{cores} usable cores, {busy:.1f} busy with other processes"


def free_cores(busy: float | None) -> float:
    """Cores' worth this process can use: its CPUs less what others keep busy on them (`busy_cores_elsewhere`),
    within its cgroup's CPU limit."""
    return min(usable_cores(), len(cpu_set()) - (busy or 0.0))


class FreeCoresWatch:
    """Keeps a training run's thread count at what `choose_threads` would choose now, as other processes come
    and go. Called after every optimizer step (a `Trainer` callback); at most every `recheck_s` seconds it
    measures the cores others kept busy since its last look, and when two looks in a row call for the same
    other count (free cores at least THREADS_MARGIN from the count it has) it sets it (`set_threads`:
    torch.set_num_threads) and says so (`log`). Two looks: a neighbour's one-second burst moves nothing. Without
    /proc/stat it does nothing."""

    def __init__(
        self,
        threads: int,
        set_threads: Callable[[int], None],
        log: Callable[[str], None] | None = None,
        recheck_s: float = RECHECK_S,
    ):
        self.threads, self.set_threads, self.log, self.recheck_s = threads, set_threads, log, recheck_s
        self.cpus = cpu_set()
        self.wanted: int | None = None  # what the last look called for, if not `threads`
        self.last = self._sample()

    def _sample(self) -> tuple | None:
        try:
            return cpu_sample(self.cpus)
        except STAT_UNREADABLE:
            return None

    def __call__(self, *_) -> None:
        if self.last is None or time.monotonic() - self.last[0] < self.recheck_s:
            return
        now = self._sample()
        busy = busy_between(self.last, now, len(self.cpus)) if now else None
        self.last = now
        if busy is None:
            return
        free = free_cores(busy)
        # within THREADS_MARGIN of the count it has, a run keeps it: free cores hovering about x.5 (a desktop's
        # background) would otherwise flip it between x and x + 1
        wanted = self.threads if abs(free - self.threads) < THREADS_MARGIN else max(1, round(free))
        if wanted == self.threads or wanted != self.wanted:
            self.wanted = None if wanted == self.threads else wanted
            return
        before, self.threads, self.wanted = self.threads, wanted, None
        self.set_threads(wanted)
        if self.log:
            self.log(f"torch threads: {before} -> {wanted} ({busy:.1f} cores busy with other processes)")
