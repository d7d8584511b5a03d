"""How this process's C allocator treats large blocks: freed memory is kept for reuse, not handed back.

glibc's malloc serves each block over 32 MB with its own ``mmap`` and unmaps it on ``free``.  A 3D ResNet
allocates and frees gigabytes of such tensors every step, so each new one is faulted in again, 4 KB at a
time, and zeroed by the kernel.  Serving every block from the heap instead (``M_MMAP_MAX = 0``) and
trimming the heap only past 2 GB of free space (``M_TRIM_THRESHOLD``) lets a freed block's pages serve the
next one.  A ResNet-50 train step at 128³ (batch 2, 2 AVX2 cores, runs interleaved) took 8.9–9.1 s
this way, 12.0–12.2 s with PyTorch's transparent-huge-page option instead (``THP_MEM_ALLOC_ENABLE``) and
9.7–10.4 s with both; peak RSS 6.2 against 5.8 GB.  Over 16 such steps the RSS settled at 5.9 GB after
the fourth (PyTorch's 64-byte-aligned blocks leave glibc small remainders, so the heap takes a few
rounds to settle).

What is kept stays with the process (its RSS stays near its high-water mark, as with PyTorch's CUDA
caching allocator) and serves later blocks of any size.  ``medcli``'s entry point applies it before any
work; ``MEDCLI_KEEP_FREED_MEMORY=0`` opts out.  glibc only: elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

from medcli import switches

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_AT = 2**31 - 1  # bytes free at the heap's top before it is returned (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep freed memory for reuse (module doc).  Returns whether the
    setting took effect (False off glibc, or when ``MEDCLI_KEEP_FREED_MEMORY=0``)."""
    if switches.switched_off(switches.KEEP_FREED_MEMORY):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl without mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_AT) == 1
