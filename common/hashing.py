"""Digests: sha256, the identity of plans (what a data manager approves), and the content addresses of blobs.

A blob is named by sha256 or by BLAKE3 (both 32 bytes), and its key in the file store says which: a sha256 is
its 64 hex characters (every blob stored before BLAKE3 came), a BLAKE3 is `blake3-` and its 64 hex characters.
New blobs are named by BLAKE3 (`BLOB_DIGEST`): measured with `bench/scaling.py --model large --ks 3` (bench/RESULTS.md,
2026-12-01), a K=3 large round hashes 14 blobs of 40 MB, and sha256 was 11.7 % of all the machine's CPU; one
thread of BLAKE3 hashes 40 MB in 7-9 ms here, sha256 in 23-24 ms. Plans stay sha256: that hash is shown to and
approved by a data manager, who can check it with `sha256sum`.

    key = blob_key("blake3", digest_bytes(data, "blake3"))   # "blake3-<64 hex>"
    parse_blob_key(key)                                      # ("blake3", "<64 hex>")
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Any, Literal

import blake3

CHUNK = 1 << 20
Algorithm = Literal["sha256", "blake3"]
DIGESTS: tuple[Algorithm, ...] = ("sha256", "blake3")
BLOB_DIGEST: Algorithm = "blake3"
"""What new blobs are named by (uploads, inline blobs); both are accepted everywhere."""
_HEX = frozenset("0123456789abcdef")


def new_digest(algorithm: Algorithm) -> Any:
    """A hasher (`update`, `hexdigest`) of `algorithm`; ValueError for another name."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        return blake3.blake3()
    raise ValueError(f"unknown digest {algorithm!r}: one of {', '.join(DIGESTS)}")


def digest_bytes(data: bytes | bytearray | memoryview, algorithm: Algorithm) -> str:
    h = new_digest(algorithm)
    h.update(data)
    return h.hexdigest()


def digest_file(path: str | Path, algorithm: Algorithm) -> str:
    h = new_digest(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def blob_key(algorithm: Algorithm, hexdigest: str) -> str:
    """The file store's name of a blob: its sha256 as it is, a BLAKE3 prefixed `blake3-`."""
    return hexdigest if algorithm == "sha256" else f"{algorithm}-{hexdigest}"


def parse_blob_key(key: str) -> tuple[Algorithm, str] | None:
    """(algorithm, hex digest) of a blob key, None when `key` is not one (`blob_key`'s inverse)."""
    if is_sha256(key):
        return "sha256", key
    if key.startswith("blake3-") and is_sha256(key[7:]):
        return "blake3", key[7:]
    return None


def key_matches(key: object, data: bytes | bytearray | memoryview) -> bool:
    """Whether `data` hashes to the blob key `key` (by the digest it names); False for anything not a key.

        key_matches(blob_key("blake3", digest_bytes(b"x", "blake3")), b"x")   # True
    """
    named = parse_blob_key(key) if isinstance(key, str) else None
    return named is not None and digest_bytes(data, named[0]) == named[1]


def sha256_bytes(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    return digest_file(path, "sha256")


def is_sha256(value: str) -> bool:
    return len(value) == 64 and _HEX.issuperset(value)


def is_blob_key(value: str) -> bool:
    return parse_blob_key(value) is not None


class BackgroundDigest:
    """The digest (sha256 or BLAKE3) of blocks handed over in order, computed on a helper thread while the caller
    reads the next block.

    hashlib and blake3 release the GIL for large blocks, so a receiver that decrypts block i+1 while block i is
    hashed uses two cores instead of one. The caller must not change a block once handed over (a whole-blob
    buffer filled front to back, or tensors' memory, qualifies; one buffer reused per block does not).

        digest = BackgroundDigest("blake3")
        for block in blocks:
            digest.update(block)
        digest.hexdigest()   # waits for the blocks still queued

    Measured: see `network/filestore_client.py` (`download_buffer`); tried for uploads and dropped (README).
    """

    def __init__(self, algorithm: Algorithm = "sha256", threaded: bool = True) -> None:
        """`threaded=False` hashes in `update` itself (for small blobs, where a thread's start costs more)."""
        self._digest = new_digest(algorithm)
        self._queue: queue.SimpleQueue[memoryview | bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=algorithm, daemon=True) if threaded else None
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

    def __enter__(self) -> BackgroundDigest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
