"""glibc malloc settings for training on CPUs: keep freed memory for reuse instead of handing it back.

Every step frees and allocates again the same large buffers (the token embedding's dense 25 MB gradient
of xm-tiny, the activations). glibc serves a block above its mmap threshold with a fresh mmap and trims
freed memory at the top of the heap, so each step page-faults those buffers in again (zero-filled by the
kernel) and unmaps them after. Serving them from the heap and not trimming it made xm-tiny's 300 warm
steps of `xmodal train` take 68.4 s instead of 87.5 s (bf16, Zen 4; `benchmarks/profile_train.py --before`,
BENCHMARKS.md profile_train 2026-12-02 18:59), with the same loss to the last bit: only where the memory
comes from changes. The cost is that the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of the heap is kept up to 2 GiB


def _mallopt():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return None


def keep_freed_memory() -> bool:
    """Blocks up to 32 MiB from the heap, and the heap not trimmed; False where the C library is not glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def glibc_default_thresholds() -> bool:
    """glibc's initial thresholds again (128 KiB each; its dynamic adjustment stays off), for comparisons."""
    mallopt = _mallopt()
    return (
        mallopt is not None
        and bool(mallopt(M_MMAP_THRESHOLD, 128 * 1024))
        and bool(mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    )
