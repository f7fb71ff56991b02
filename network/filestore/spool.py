"""An upload's body, hashed while it arrives and written once, to the file the store then keeps.

Django's ASGI handler spools a body to an unnamed temporary file; the PUT view then read it back,
hashed it and wrote a second copy for `access.store` to move into place. Here the body goes to a
named file in the store's tmp folder as it arrives, hashed block by block on the way, so the view
only compares the digest and hands the file over (`os.replace`, no copy).

Measured (40 MB PUT over HTTPS, 2-core VM at load 10, bench/blobs.py): the client waited 0.34 s for
the store's answer after its last byte (read back, hash, copy); with the body hashed on arrival, the
answer takes the time of a rename and two SQLite rows.

    spool = HashingSpool(tmp_dir, prefix="put.", algorithm="blake3")
    spool.write(b"...")              # each body message as it arrives
    spool.hexdigest(), spool.size    # at the view, without reading the body again
    spool.detach()                   # the path, now the caller's; close() removes a file not detached
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fedsilo.common.hashing import DIGESTS, Algorithm, new_digest, parse_blob_key


class HashingSpool:
    """A write-once body file in `directory` that hashes what is written to it; readable like a file.

        with HashingSpool(Path("tmp")) as spool:
            spool.write(b"abc"); spool.seek(0)
            assert spool.read() == b"abc" and spool.size == 3
    """

    def __init__(self, directory: Path, prefix: str = "body.", algorithm: Algorithm = "sha256") -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
        self.name = name
        self._file = os.fdopen(fd, "w+b")
        self.algorithm = algorithm
        self._digest = new_digest(algorithm)
        self.size = 0
        self._detached = False

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._file.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def detach(self) -> str:
        """Flush and hand the file's path over: `close()` leaves it in place from now on."""
        self._file.flush()
        self._detached = True
        return self.name

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def readline(self, size: int = -1) -> bytes:
        return self._file.readline(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        if not self._detached:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> HashingSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # readable(), fileno(), ... as Django's request stream asks
        return getattr(self._file, name)


def upload_digest(scope: dict[str, Any]) -> Algorithm:
    """The digest an upload is named by: a PUT's from its URL's key, a POST's from `?digest=` (sha256 when neither
    names a known one: the view then refuses a key that is not one, and an unknown digest)."""
    if scope.get("method") == "PUT":
        parsed = parse_blob_key(scope.get("path", "").rstrip("/").rpartition("/")[2])
        return parsed[0] if parsed else "sha256"
    named = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("digest", ["sha256"])[-1]
    return named if named in DIGESTS else "sha256"  # type: ignore[return-value]


async def read_body_hashed(receive: Any, directory: Path, algorithm: Algorithm = "sha256") -> HashingSpool:
    """Django's `ASGIHandler.read_body` for an upload: the body into a `HashingSpool` as it arrives.

    Each block is hashed and written on the event loop. Handing that to a thread, to overlap it with the
    decryption of the next block, was measured and dropped (5 x 40 MB PUTs, alternated 3 times, load 9-10):
    the store used 1.34-1.83 CPU s against 1.10-1.40 s, and the uploads took no less wall time. Measured again
    with the client hashing while it sends (bench/blobs.py, 40 MB, 2026-11-30 19:50-19:53, load 6.6-7.3, other
    processes 71-81 % of the CPU, alternated twice; hash + write on a thread, one block in flight): uploads 0.480
    and 0.262 s against 0.476 and 0.198 s on the loop. Two cores hold the client and the store already.
    """
    from django.core.exceptions import RequestAborted

    spool = HashingSpool(directory, prefix="put.", algorithm=algorithm)
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted()
            if message.get("body"):
                spool.write(message["body"])
            if not message.get("more_body", False):
                break
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool
