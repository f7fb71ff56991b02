"""glibc's allocator told to keep freed memory for reuse, in the processes that handle whole models each round.

glibc serves an allocation over its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with a fresh
`mmap` and returns it to the kernel on `free`; it also trims the heap's top once 2x that threshold is free. A
process that allocates and frees the same large tensors every step (a gradient per layer with
`zero_grad(set_to_none=True)`, a model built and loaded each round, a 40 MB download buffer) then takes a page
fault and the kernel zeroes a page for every 4 KiB of them, every time. Measured (perf, K=10 nodes, peerbench
large model, 10.1 M parameters, 2026-12-01): 24 % of all the machine's CPU in a round was the kernel clearing
such pages (`clear_page_erms`), most of it under the workers' sgemm, memset and uniform init. One worker training
six rounds alone: 9,800-119,000 minor faults a round and 0.37-0.57 s; with `keep_freed_memory()` 0-4,200 faults
and 0.34-0.35 s.

The cost: a process keeps its peak heap until it exits (a round's process is a job's; the daemon's peak is a
few model-sized buffers). Not for the researcher's process, which is the user's (a notebook's kernel).

    from fedsilo.common.malloc import keep_freed_memory
    keep_freed_memory()   # once, early; False where the C library is not glibc
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedsilo.common.malloc")

OPTIONS = {"trim_threshold": -1, "mmap_threshold": -3, "mmap_max": -4, "arena_max": -8}
"""mallopt's parameters by name, <malloc.h>."""
TRIM_THRESHOLD = 2**31 - 1
"""The heap's free top kept, at most (mallopt takes an int): 2 GiB, i.e. in practice never given back; the
process is a job's or a daemon's, it exits or plateaus."""


def set_malloc(**options: int) -> bool:
    """glibc's `mallopt` for each of `options` (names of `OPTIONS`); True when glibc accepted them all, False
    where the C library has no mallopt (not glibc): nothing changes there.

        set_malloc(mmap_threshold=4 << 20, trim_threshold=64 << 20)"""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = all([mallopt(OPTIONS[name], value) for name, value in options.items()])
    if not done:
        log.info("the C library refused mallopt(%s): allocations keep their default path", options)
    return done


def keep_freed_memory() -> bool:
    """No mmap per large allocation, no trim of the heap, one arena: freed blocks are reused, already faulted in.

    Large blocks come from the heap (glibc still falls back to mmap when the heap cannot grow). One arena because
    a thread's own arena lives in 64 MiB heaps that glibc unmaps as soon as one is wholly free, whatever the trim
    threshold (strace of a daemon, 2026-12-01: a 128 MiB mmap and two munmaps every round, 9,900 page faults a
    round for its 40 MB download); the processes this is for do their heavy work in a thread or two and do not
    contend on the arena's lock. True when glibc accepted the settings."""
    return set_malloc(arena_max=1, mmap_max=0, trim_threshold=TRIM_THRESHOLD)
