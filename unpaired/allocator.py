"""The host memory allocator for torch's CPU work: freed tensor memory is kept for the next step
instead of being handed back to the kernel and faulted in again.

Why: torch's CPU tensors come from the C library's malloc. glibc serves a large block (128 KiB and
up, a threshold it raises as it goes) with a fresh mmap, and gives back the free memory at the top
of its heap once that passes a trim threshold. A CPU train step allocates and frees its activations
(MiBs each) over and over, so every step maps new memory and takes a page fault per 4 KiB of it:
about 1,500 minor faults per step of the default model, and 6-10 % of the step's time
(benchmarks/allocator.py). `keep_freed_memory` raises both thresholds (mallopt), as PyTorch's
tuning guide does with jemalloc or tcmalloc preloaded; a library cannot preload an allocator into
the process it runs in, and mallopt is the C library's own switch, so this calls it through ctypes.
It never changes a number: only where tensors live in memory. The cost: up to TRIM_THRESHOLD of
freed memory stays with the process (counted in its RSS) until it exits.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused when freed: glibc's largest allowed value on
# 64-bit systems (larger ones are refused), above any activation of the default model at 256 px.
MMAP_THRESHOLD = 32 * 2**20
# Free memory the heap keeps before it gives any back to the kernel.
TRIM_THRESHOLD = 1024 * 2**20
# Environment settings through which a user tunes glibc's malloc: when one is set, it is theirs.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD) for this process.
    Returns whether it did: False, changing nothing, on a C library other than glibc (musl,
    macOS, Windows) and where the user tunes malloc through the environment (USER_SETTINGS, or a
    `glibc.malloc` tunable in GLIBC_TUNABLES). Affects the allocations made after it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Trim first: setting the mmap threshold also fixes the trim threshold at twice its value unless
    # one was set (glibc stops adjusting both once either is set by hand).
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
