"""glibc's allocator, set up for training on the CPU (opt-in: TRANSFERCTL_GLIBC_TUNING=1).

By default glibc serves an allocation larger than its mmap threshold (128 KB, raised as it goes up to 32 MB)
with a fresh `mmap`, returns it with `munmap` when freed, and gives back freed memory at the top of the heap. A
training step allocates and frees activations of tens to hundreds of MB, so every step faults in and zeroes
those pages again; on a small CPU that is a large share of the step. With a high mmap threshold and no trimming,
freed blocks stay in the heap and the next step reuses them; the arithmetic is unchanged. The cost is memory:
the process keeps its peak working set, and DataLoader workers forked from it later (the loader and stream
pipelines fork theirs every epoch) inherit that heap, which becomes theirs page by page as the parent reuses it.
That is why it is not the default. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
SETTINGS = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1))
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's allocator up for training (once per process); whether it is."""
    global _applied
    if _applied is None:
        _applied = os.environ.get("TRANSFERCTL_GLIBC_TUNING", "0") == "1" and _mallopt_all()
    return _applied


def _mallopt_all() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
