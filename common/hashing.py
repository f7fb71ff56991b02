"""sha256 helpers: the identity of plans and blobs."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def sha256_bytes(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class BackgroundSha256:
    """sha256 of blocks handed over in order, computed on a helper thread while the caller reads the next block.

    hashlib releases the GIL for blocks over 2 KiB, so a receiver that decrypts block i+1 while block i is
    hashed uses two cores instead of one. The caller must not change a block once handed over (a whole-blob
    buffer filled front to back, or tensors' memory, qualifies; one buffer reused per block does not).

        digest = BackgroundSha256()
        for block in blocks:
            digest.update(block)
        digest.hexdigest()   # waits for the blocks still queued

    Measured: see `network/filestore_client.py` (`download_buffer`); tried for uploads and dropped (README).
    """

    def __init__(self, threaded: bool = True) -> None:
        """`threaded=False` hashes in `update` itself (for small blobs, where a thread's start costs more)."""
        self._digest = hashlib.sha256()
        self._queue: queue.SimpleQueue[memoryview | bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()
        self._done = False

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            self._digest.update(block)

    def update(self, block: memoryview | bytes) -> None:
        if self._done:
            raise ValueError("update() after hexdigest() or close()")
        if self._thread is None:
            self._digest.update(block)
        else:
            self._queue.put(block)

    def close(self) -> None:
        """Stop the helper thread once the blocks queued so far are hashed (idempotent; an error path calls it)."""
        if not self._done:
            self._done = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def __enter__(self) -> BackgroundSha256:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
