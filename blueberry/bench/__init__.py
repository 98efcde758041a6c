"""`make bench` / `blueberry bench`: throughput, MFU, speed ratios and speed targets on this machine."""

from blueberry.bench.suite import format_table, run_bench

__all__ = ["format_table", "run_bench"]
