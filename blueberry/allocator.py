"""Keep freed memory in the process (glibc): a CPU step's large temporaries reuse pages instead of faulting in new.

PyTorch's CPU tensors come from malloc. glibc serves every block of 32 MiB or more (its largest mmap threshold)
with a fresh `mmap` and unmaps it when it is freed, and it hands the top of its heap back to the OS once more
than twice the threshold is free there. A training step on a CPU allocates and frees the same large temporaries
in every layer and micro-step (the attention scores, 32 MiB in fp32 at 16 × 8 heads × 256², the FFN's hidden
activations, the LM head's logit chunks), so each is page-faulted in and zero-filled by the kernel again:
a 32 MiB fp32 `clone` took 9.2 ms, 2.9 ms with the settings below (2-core AVX512-BF16 EPYC). Serving every
block from the heap and never trimming it keeps those pages; the step's peak memory stays the same, and what
the process holds after its peak stays held until it exits (or `malloc_trim`).

Measured with `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`, which is what this
sets at run time: 512d dense bf16 step (study recipe) 5.16 / 4.67 / 4.34 s → 4.58 / 4.37 / 3.92 s, first step
8.5 / 4.6 / 5.1 s → 5.4 / 4.5 / 4.5 s (three interleaved pairs); peak RSS within ±4 %.

Leaf module: standard library only.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = -1  # as M_TRIM_THRESHOLD: "disables trimming completely" (mallopt(3))


@functools.cache
def _libc():
    """The C library this process runs on, when it is glibc (the only one with these mallopt parameters), else
    None: the symbols already loaded (`dlopen(NULL)`), not a library looked up on disk."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no dlopen(NULL)
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory(libc=None) -> bool:
    """Serve all of malloc from the heap (no mmap'd blocks) and never trim it. Returns whether it took effect
    (False where the C library is not glibc: macOS, musl)."""
    libc = _libc() if libc is None else libc
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_freed_memory(libc=None) -> bool:
    """Hand the heap's free memory back to the OS now (`malloc_trim(0)`), the setting above notwithstanding: the
    bench does it between cases so that each gets its own peak. Returns whether it ran (glibc only)."""
    libc = _libc() if libc is None else libc
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
