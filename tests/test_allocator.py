"""The allocator setting: on glibc, freed memory stays in the process (no mmap'd blocks, no trimming)."""

import subprocess
import sys

import pytest

from blueberry import allocator

PROBE = """
import sys, torch
from blueberry.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else False
def rss_mb():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: its pages are in
held = rss_mb()
del x
print(took, held - rss_mb())
"""


@pytest.mark.skipif(allocator._libc() is None, reason="the C library is not glibc")
def test_a_freed_large_tensor_stays_mapped_only_with_the_setting():
    released = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        took, released[mode] = out.stdout.split()
        assert took == str(mode == "keep")
    assert int(released["default"]) >= 60  # glibc unmapped the 64 MiB block at once
    assert int(released["keep"]) <= 4  # kept for the next tensor of that size


class FakeGlibc:
    def __init__(self):
        self.calls = []

        def mallopt(param, value):  # a plain function: keep_freed_memory sets its argtypes
            self.calls.append((param, value))
            return 1

        self.mallopt = mallopt


def test_the_mallopt_parameters_and_no_glibc(monkeypatch):
    libc = FakeGlibc()
    assert allocator.keep_freed_memory(libc)
    assert libc.calls == [(-4, 0), (-1, -1)]  # M_MMAP_MAX = 0; M_TRIM_THRESHOLD = -1: never trim
    monkeypatch.setattr(allocator, "_libc", lambda: None)  # macOS, musl
    assert allocator.keep_freed_memory() is False


def test_release_hands_the_free_heap_back(monkeypatch):
    libc = FakeGlibc()
    libc.malloc_trim = lambda pad: libc.calls.append(("malloc_trim", pad))
    assert allocator.release_freed_memory(libc) and libc.calls == [("malloc_trim", 0)]
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.release_freed_memory() is False
