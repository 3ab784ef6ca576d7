"""Process-level settings that make CPU training faster."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory (no mmap, no trim); False if not glibc.

    Large tensors otherwise come from fresh mmap pages each step, and first-touch page
    faults (~0.4 ms per MB here) cost more than the GEMMs that write the E expert weight
    gradients. Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
