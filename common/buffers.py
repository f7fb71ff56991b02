"""Large writable buffers that fill fast: where a blob is received before it is parsed in place.

`bytearray(n)` zeroes its memory, and a fresh 40 MB block (glibc maps blocks over 32 MiB anew each time)
then faults in 10,000 4 KiB pages as it is zeroed and again as it is filled. numpy's allocator asks the kernel
for transparent huge pages on blocks of 4 MiB and more (`madvise(MADV_HUGEPAGE)`, which the kernel honours in
its default "madvise" mode) and leaves the memory as the kernel gave it (zeroed). Measured (40 MB, 2-core VM,
2026-12-01, THP "madvise", median of 20): `bytearray` 18.8 ms to allocate; an ndarray allocated and touched
once per page 4.9 ms.
"""

from __future__ import annotations

import sys
import threading

import numpy as np


def fresh_buffer(size: int) -> memoryview:
    """A writable, byte-addressed buffer of `size` bytes, owned by whoever holds the view (or anything made
    from it: `np.frombuffer`, a tensor). Its contents are unspecified until written.

        buf = fresh_buffer(40 << 20); sock.recv_into(buf); bytes(buf[:4])
    """
    return memoryview(np.empty(size, dtype=np.uint8)).cast("B")


POOL_MIN_BYTES = 4 << 20
"""Smaller buffers are not pooled: they come from malloc's heap, already faulted in, in any process."""
POOL_KEEP_BYTES = 256 << 20
"""Idle buffers a pool keeps, in bytes, at most (the researcher's: a few models' worth between rounds)."""


class BufferPool:
    """`fresh_buffer`s kept and handed out again once nothing refers to them: no new pages per blob.

    For a process whose allocator returns large blocks to the kernel on `free` (glibc maps blocks over 32 MiB
    anew each time; the researcher's process is the user's, so `common.malloc.keep_freed_memory` is not for
    it): a fresh 40 MB block faults in and the kernel zeroes every page of it, again each round. Measured
    (`perf`, K=3 nodes, peerbench large model, 2026-12-01): the researcher's `clear_page_erms` under the TLS read
    into new download buffers was 29 % of its CPU, 0.11 CPU-s a round.

    A buffer is idle when only the pool refers to it (CPython's reference count): every view, memoryview, numpy
    array or tensor made from it holds a reference to it, so one that is still in use is never handed out.
    Pooled: `min_bytes` and more; a request is served by an idle buffer of its size (up to 1/8 more); idle ones
    past `keep_bytes` are dropped.

        pool = BufferPool()
        buf = pool.take(40 << 20); sock.recv_into(buf); params = params_from_bytes(buf, copy=False)
        del buf, params                 # the next take(40 << 20) reuses the memory
    """

    def __init__(self, keep_bytes: int = POOL_KEEP_BYTES, min_bytes: int = POOL_MIN_BYTES) -> None:
        self.keep_bytes, self.min_bytes = keep_bytes, min_bytes
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _idle(self, i: int) -> bool:
        # the list's reference and getrefcount's argument: nothing else holds the array
        return sys.getrefcount(self._arrays[i]) <= 2

    def take(self, size: int) -> memoryview:
        """A writable buffer of `size` bytes (contents unspecified), as `fresh_buffer` returns."""
        if size < self.min_bytes:
            return fresh_buffer(size)
        with self._lock:
            chosen = None
            for i in range(len(self._arrays)):
                capacity = self._arrays[i].nbytes
                if size <= capacity <= size + size // 8 and self._idle(i):
                    chosen = self._arrays.pop(i)
                    break
            if chosen is None:
                chosen = np.empty(size, dtype=np.uint8)
            self._trim()
            self._arrays.append(chosen)  # most recently used last: trimmed last
            return memoryview(chosen[:size]).cast("B")

    def trim(self) -> int:
        """Drop idle buffers past `keep_bytes` now (a `take` does it too); the bytes still tracked. For the end of
        a round: an aggregator that kept every update (a median) frees them all at once, after the round's last
        `take`."""
        with self._lock:
            self._trim()
            return sum(a.nbytes for a in self._arrays)

    def _trim(self) -> None:
        idle = [i for i in range(len(self._arrays)) if self._idle(i)]
        kept = sum(self._arrays[i].nbytes for i in idle)
        drop = set()
        for i in idle:  # oldest first
            if kept <= self.keep_bytes:
                break
            kept -= self._arrays[i].nbytes
            drop.add(i)
        self._arrays = [a for i, a in enumerate(self._arrays) if i not in drop]

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer the pool tracks, in use or idle."""
        with self._lock:
            return sum(a.nbytes for a in self._arrays)

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers nothing but the pool refers to."""
        with self._lock:
            return sum(self._arrays[i].nbytes for i in range(len(self._arrays)) if self._idle(i))
