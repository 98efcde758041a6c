"""`make bench` / `blueberry bench`: throughput, MFU, speed ratios and speed targets on this machine.

Exports load on first use (`blueberry.lazy_exports`): the contention measurement's busy-loop processes
start by importing `blueberry.bench.contention`, and the suite's torch and transformers (about 6 s of a core
each) would otherwise come with it.
"""

from blueberry.lazy_exports import lazy_exports

_EXPORTS = {"format_table": "suite", "run_bench": "suite"}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
