"""Keep freed memory in the process, so the tile stream does not pay page faults to get it back.

The stream allocates and frees megabytes per step: a decoded block per read (4 MB for a
2048 x 2048 uint8 plane), chunk buffers inside tensorstore, a batch per step. glibc hands
large freed blocks back to the kernel (munmap, or trimming the heap top), and every 4 KB page
of the next allocation then costs a page fault and a zero-fill. Measured on the 2-core
development machine: 13 faults per 224 px tile in the stream's loop, 8 with the settings
below, and about 10% more tiles per CPU-second (benchmarks/RESULTS.md).

`keep_freed_memory` raises glibc's mmap threshold (allocations up to 32 MB come from the
heap) and its trim threshold (up to 512 MB of free heap stays mapped), the usual tuning
for allocation-heavy data loaders. The price is that a process's resident memory does not
shrink below its recent peak (plus at most 512 MB). It changes nothing where the C
library is not glibc (macOS, musl) and can be turned off with SSL_EM_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_applied: bool | None = None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Apply the glibc settings once per process; True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SSL_EM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):  # not glibc
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _applied
