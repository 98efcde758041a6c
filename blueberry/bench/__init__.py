"""`make bench` / `blueberry bench`: throughput, MFU, speed ratios and speed targets on this machine.

Exports load on first use (PEP 562), as in `blueberry.models`: the contention measurement's busy-loop processes
start by importing `blueberry.bench.contention`, and the suite's torch and transformers (about 6 s of a core
each) would otherwise come with it.
"""

import importlib

_EXPORTS = {"format_table": "suite", "run_bench": "suite"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
