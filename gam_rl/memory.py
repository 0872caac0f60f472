"""Keep freed heap memory in the process instead of handing it back to the OS after every step.

A training step frees and re-allocates the same few-MB tensors (dropout masks, gradients, the
head's outputs) every time. glibc's defaults return such blocks to the OS (they are mmapped, or
trimmed off the heap's top), so the next step's first write to each page faults: about 3,000 minor
faults per 2 x 64 training step at batch 500, ~2 ms of its ~23. `retain_freed_memory()` sets
M_MMAP_THRESHOLD to 32 MiB (blocks below it come from the heap) and M_TRIM_THRESHOLD to 1 GiB (the
heap keeps up to that much free memory), as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would.
The cost is resident memory: the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**30


@functools.cache  # once per process
def retain_freed_memory() -> bool:
    """Set glibc's thresholds; False where it does not apply: not glibc, switched
    off (GAM_RL_MALLOC=0), or the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ already."""
    applies = (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
               and os.environ.get("GAM_RL_MALLOC", "1") != "0"
               and not any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")))
    if applies:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            applies = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            applies = False
    return applies
