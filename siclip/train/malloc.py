"""Keep freed memory in the process: glibc's malloc otherwise returns every large tensor's pages to the kernel.

By default glibc serves a large allocation with a fresh ``mmap`` and unmaps it on ``free``, so each forward
pass of a CPU model faults every page of its activations in again (and zeroes them). MobileCLIP-S0's image
encoder on this project's 2-core VM, per image (benchmarks/RESULTS.md, session 7):

=========================  ======  ======  ======  ======  ======
batch                          1       4      16      32      64
=========================  ======  ======  ======  ======  ======
glibc defaults (ms)          33.3    28.2    42.4    58.5    71.5
:func:`keep_freed_memory`    24.6    20.1    22.5    23.5    22.6
=========================  ======  ======  ======  ======  ======

with 28.8 M page faults and 47 s of kernel time against 0.4 M and 0.9 s. :func:`keep_freed_memory` raises
``M_MMAP_THRESHOLD`` to 1 GiB (smaller blocks come from the heap and are reused) and ``M_TRIM_THRESHOLD`` to its
maximum (the heap is not shrunk after each pass); setting either turns glibc's dynamic threshold off, so both
are set. The price: the process keeps its peak heap. The command-line scripts call it; a library import never
changes the process. ``LD_PRELOAD`` of jemalloc or tcmalloc does the same job where those are installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1  # an int: mallopt takes one


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True when it took effect (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
