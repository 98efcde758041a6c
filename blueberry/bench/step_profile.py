"""Where one settled training step spends its time, op by op (`blueberry profile SPEC.json`).

`torch.profiler` with `record_shapes` keeps references to the step's tensors, so on a CPU it changes what it
measures (a 512d step took 2.5x as long under it). Here a TorchDispatchMode reads a clock around every aten call
and sums the time by op name, over one cycle of the run's first optimizer (from its step after `settle` training
steps to its next one: one step's forward, backward and optimizer work), through the real trainer on synthetic
tokens as `make bench` measures. Settled, because a 512d MoE on a CPU takes 3-4 steps to reach the memory it
then keeps. On CUDA every op is synchronised, so the times are the GPU's (and the step is slower than unprofiled).
"""

from __future__ import annotations

import collections
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

from blueberry.bench.measure import measure_throughput
from blueberry.hardware import resolve_device
from blueberry.spec import RunSpec

MATMUL_OPS = frozenset({"mm", "bmm", "baddbmm", "addmm", "addbmm", "_grouped_mm"})


class OpClock(TorchDispatchMode):
    """Wall seconds and calls per aten op while `running`; `sync` waits for CUDA after every op."""

    def __init__(self, sync: bool = False):
        super().__init__()
        self.sync, self.running = sync, False
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.running:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.sync:
            torch.cuda.synchronize()
        name = func.overloadpacket.__name__
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1
        return out


class _FirstOptimizerCycle:
    """Runs `clock` from the first optimizer's step number `after` to its next step (an optimizer step hook)."""

    def __init__(self, clock: OpClock, after: int):
        self.clock, self.after = clock, after
        self.first, self.steps, self.started, self.window_s = None, 0, 0.0, None

    def __call__(self, optimizer, args, kwargs) -> None:
        self.first = optimizer if self.first is None else self.first
        if optimizer is not self.first:
            return
        self.steps += 1
        if self.steps == self.after:
            self.clock.running, self.started = True, time.perf_counter()
        elif self.steps == self.after + 1:
            self.clock.running, self.window_s = False, time.perf_counter() - self.started


def profile_step(spec: RunSpec, settle: int = 4) -> dict:
    """One training step's time per aten op, after `settle` ≥ 1 steps: the window, the ops (slowest first) and
    the matmuls' time."""
    clock = OpClock(sync=resolve_device(spec.train.device).type == "cuda")  # the device the run takes
    cycle = _FirstOptimizerCycle(clock, settle)
    handle = register_optimizer_step_post_hook(cycle)
    try:
        with clock:
            measured = measure_throughput(spec, warmup=settle, repeats=1)
    finally:
        handle.remove()
    window = cycle.window_s
    ops = sorted(
        ({"op": name, "s": seconds, "calls": clock.calls[name]} for name, seconds in clock.seconds.items()),
        key=lambda row: -row["s"],
    )
    matmul_s = sum(row["s"] for row in ops if row["op"] in MATMUL_OPS)
    return {
        "precision": measured["precision"],
        "threads": torch.get_num_threads(),
        "settle_steps": settle,
        "window_s": window,
        "ops_s": sum(row["s"] for row in ops),
        "matmul_s": matmul_s,
        "ops": ops,
    }


def format_profile(result: dict, top: int = 20) -> str:
    """`profile_step`'s result as a header line and a Markdown table of the `top` slowest ops."""
    window = result["window_s"]
    lines = [
        f"one step after {result['settle_steps']} ({result['precision']}, {result['threads']} threads): "
        f"{window:.3f} s; aten ops {result['ops_s']:.3f} s, matmuls {result['matmul_s']:.3f} s "
        f"({result['matmul_s'] / window:.0%} of the step), the rest outside ops (Python, the clock)",
        "",
        "| op | ms | share of the step | calls |",
        "|---|---:|---:|---:|",
    ]
    for row in result["ops"][:top]:
        lines.append(f"| {row['op']} | {row['s'] * 1e3:.1f} | {row['s'] / window:.1%} | {row['calls']} |")
    if len(result["ops"]) > top:
        rest = result["ops"][top:]
        lines.append(f"| {len(rest)} other ops | {sum(r['s'] for r in rest) * 1e3:.1f} | | |")
    return "\n".join(lines)
