"""Freed memory goes back to the system: glibc's malloc keeps what is freed at the top of its heap
until that exceeds its trim threshold, and raises that threshold (up to 64 MiB) each time a large
block it had mapped on its own is freed. A serving process frees such blocks (big response bodies,
query results), so the thresholds rose and freed memory stayed resident: bench/rss.py measured
opsbot's RSS growing ~1 MiB per 1,000 requests that no live object explained (glibc's bytes in use
flat at 28.0 MiB, its free bytes 3.4 → 7.5 MiB over 8,000 requests, and ``malloc_trim(0)`` took
RSS back to where it started). With the thresholds fixed its free bytes stay at 1.2–1.5 MiB.
Setting both thresholds once, at start-up, keeps them fixed (the mmap threshold at glibc's default),
as ``MALLOC_TRIM_THRESHOLD_`` in the environment does; when that is set, it is left to decide."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
TRIM_THRESHOLD = 64 * 1024  # bytes free at the heap's top past which glibc gives them back (its default: 128 KiB, then rising)
MMAP_THRESHOLD = 128 * 1024  # blocks this large or larger get a mapping of their own, given back when freed (glibc's default)


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at ``MMAP_THRESHOLD`` and ``TRIM_THRESHOLD``; True if set. Nothing on another C
    library or system, nor when ``MALLOC_TRIM_THRESHOLD_`` is in the environment."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no libc.so.6: its own allocator's rules apply
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both: by the time this runs, the imports may have raised the mmap threshold already (to the
    # largest block freed so far), and large blocks would then be carved from the heap.
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); freed memory may stay resident")
        return False
    return True
