"""Client of the file store (docs/internals.md): content-addressed uploads and verified downloads."""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable, Iterator
from http.client import HTTPException
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import requests
from requests.adapters import HTTPAdapter

from fedsilo.common.buffers import BufferPool, fresh_buffer
from fedsilo.common.config import Timeouts
from fedsilo.common.errors import TransferError
from fedsilo.common.hashing import BLOB_DIGEST, Algorithm, BackgroundDigest, digest_bytes, digest_file, new_digest

from .credentials import FileStoreSettings
from .messages import BlobRef
from .pki import client_context

log = logging.getLogger("fedsilo.network.filestore_client")

CHUNK = 1 << 20
"""Bytes read from the socket (straight into the blob's buffer) and hashed at a time."""
BACKGROUND_HASH = 4 << 20
"""Downloads from this size on are hashed on a helper thread while they arrive (`_receive`)."""
SMALL_BLOB = 1 << 20
"""Blobs up to this size are uploaded without asking first whether the store holds them: the question
costs a round trip, as much as the upload itself, and the store answers 200 for a blob it already has."""


class Payload(Protocol):
    """A blob held as buffers, hashed by itself and sent without being joined
    (`fedsilo.common.serialization.SerializedParams`; named here so that the client does not import torch)."""

    def digest(self, algorithm: Algorithm) -> str: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Any: ...


READERS_HEADER = "X-Fedsilo-Readers"
"""On a PUT: the parties, besides the uploader, that may read the blob (comma-separated names)."""
HOLD_HEADER = "X-Fedsilo-Readers-Hold"
"""With READERS_HEADER, "1": the blob is handed over, each reader holds it until it releases it."""


class BlobTransferError(TransferError):
    """A file-store call failed; `status` is the HTTP status (None when the server was not reached)."""

    def __init__(self, message: str, status: int | None = None, server_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class TlsAdapter(HTTPAdapter):
    """HTTPS with the consortium's TLS context (`pki.client_context`): its CA only, the party's certificate.

        session.mount("https://", TlsAdapter(client_context(creds.tls)))
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Leave the context alone: requests would load certifi's public CAs into it, and a certificate
        any public CA issued for the store's address would then pass."""


def http_session(settings: FileStoreSettings) -> requests.Session:
    """A `requests` session for the store at `settings.url`: TLS per the credentials, proxies resolved once."""
    session = requests.Session()
    # Proxies are resolved once here: with trust_env on, requests would re-read the environment and
    # ~/.netrc on every call, which costs more than the local request itself.
    session.proxies.update(requests.utils.get_environ_proxies(settings.url))
    session.trust_env = False
    session.verify = settings.ca or True
    if settings.tls is not None:
        session.mount("https://", TlsAdapter(client_context(settings.tls)))
    return session


def store_healthy(settings: FileStoreSettings, url: str | None = None, timeout: float = 1.0) -> bool:
    """Whether the store answers its health check (at `url`, default the one in `settings`)."""
    with http_session(settings) as session:
        try:
            return session.get(url or f"{settings.url.rstrip('/')}/api/v1/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False


class FileStoreClient:
    """One keep-alive HTTP session to the file store, authenticated with the party's token."""

    def __init__(self, settings: FileStoreSettings, timeouts: Timeouts | None = None) -> None:
        timeouts = timeouts or Timeouts()
        self.url = settings.url.rstrip("/")
        self._api = f"{self.url}/api/v1"
        self._timeout = (timeouts.connect, timeouts.transfer)
        session = http_session(settings)
        session.headers["Authorization"] = f"Token {settings.token}"
        self._session = session
        self._granted: dict[str, set[str]] = {}  # blob key -> readers named by this client (ensure_readers)

    # ------------------------------------------------------------------ public API
    def health(self) -> dict[str, Any]:
        response = self._call("GET", f"{self._api}/health", what="health check")
        return response.json()

    def exists(self, key: str) -> bool:
        """Whether the store holds the blob named `key` (`BlobRef.key`) and this party may read it."""
        response = self._call("HEAD", self._blob_url(key), what=f"blob {key[:19]}", ok=(200, 404))
        return response.status_code == 200

    def upload_bytes(self, data: bytes | Payload, readers: Iterable[str] = (), hold: bool = False,
                     digest: Algorithm = BLOB_DIGEST) -> BlobRef:  # fmt: skip
        """Store `data` readable by this party and `readers` (party names); return its reference, named by
        `digest` (BLAKE3 by default; a plan is uploaded by sha256, its approved hash). `hold`: the blob is handed
        over, each reader holds it until it releases it (else only this party's hold keeps it).

        A blob over `SMALL_BLOB` is hashed while it is sent (`POST /api/v1/blobs`, the store answers its digest,
        checked against this client's), not hashed first and then sent: the store receives while the client
        hashes. A `Payload` (`params_to_buffers`' result) is sent from the tensors' memory, uncopied.
        """
        readers = list(readers)
        try:
            if len(data) > SMALL_BLOB:
                return self._post(data, readers, hold, digest)
            ref = _ref(data, digest)
            self._put(ref, data, readers, hold)
            return ref
        except BlobTransferError as exc:
            # Over a limit lowered since the blob was stored: it is there all the same.
            if exc.status != 413 or not self.exists((ref := _ref(data, digest)).key):
                raise
            self.grant(ref, readers)
            return ref

    def upload_file(self, path: str | Path, readers: Iterable[str] = (), digest: Algorithm = BLOB_DIGEST) -> BlobRef:
        """Stream a file to the store without reading it into memory (readers and digest as in `upload_bytes`)."""
        p = Path(path)
        ref = BlobRef.named(digest, digest_file(p, digest), p.stat().st_size)
        with open(p, "rb") as f:
            self._put_unless_readable(ref, f, list(readers))
        return ref

    def grant(self, ref: BlobRef, readers: Iterable[str]) -> None:
        """Let `readers` (party names) read a blob this party uploaded, e.g. a plan reused in a later round."""
        names = sorted(set(readers))
        if names:
            self._call("POST", f"{self._blob_url(ref.key)}/readers", what=f"grant of blob {ref.digest[:12]}",
                       json={"readers": names})
            self._granted.setdefault(ref.key, set()).update(names)

    def ensure_readers(self, ref: BlobRef, readers: Iterable[str]) -> BlobRef:
        """Grant `ref` to those of `readers` this client has not granted it to yet (no call when none)."""
        missing = set(readers) - self._granted.get(ref.key, set())
        if missing:
            self.grant(ref, missing)
        return ref

    def release(self, ref: BlobRef) -> bool:
        """Tell the store this party no longer needs `ref` (`DELETE`): the blob goes once no party holds it (each
        upload holds it once, a reader it was handed over to until it releases it). True when the store removed it
        now; False when others still hold it, when it was gone already or not this party's to read (404: expired,
        released before), and for a ref carried inline (never stored)."""
        if ref.data is not None:
            return False
        self._granted.pop(ref.key, None)  # uploaded again later, it is granted again
        response = self._call("DELETE", self._blob_url(ref.key), what=f"release of blob {ref.digest[:12]}",
                              ok=(200, 404))  # fmt: skip
        try:
            return response.status_code == 200 and response.json().get("removed") is True
        except (ValueError, AttributeError):
            return False

    def release_all(self, refs: Iterable[BlobRef]) -> None:
        """`release` each stored ref of `refs` once a round is done with them; a failure is logged, never raised
        (the round's outcome does not depend on it, and retention removes what a release missed)."""
        for ref in {r.key: r for r in refs if r.data is None}.values():
            try:
                self.release(ref)
            except BlobTransferError as exc:
                log.info("blob %s not released (retention will remove it): %s", ref.digest[:12], exc)

    def download_bytes(self, ref: BlobRef, max_bytes: int | None = None) -> bytes:
        """Fetch a blob into memory, refusing it beyond `max_bytes` and checking its size and digest; a ref that
        carries its data inline (`BlobRef.data`) is answered from it, without a request."""
        return bytes(self.download_buffer(ref, max_bytes))

    def download_buffer(self, ref: BlobRef, max_bytes: int | None = None, pool: BufferPool | None = None) -> memoryview:
        """`download_bytes` into a new writable buffer the caller owns (`common.buffers.fresh_buffer`, or one
        `pool` holds that nothing uses any more): read
        from the socket straight into it and hashed as it arrives, no other copy (`params_from_bytes(buf,
        copy=False)` then parses it in place).

        Measured (40 MB over HTTPS, 2-core VM at load 10): iter_content chunks joined 0.50 s, of which 0.09 s
        joining; straight into the buffer 0.33 s. Quiet machine, 2026-12-01 (`bench/blobs.py`'s download, median
        of 20): 0.093 s into a `bytearray` hashed in line; 0.081 s hashed on a helper thread; 0.071 s into a
        `fresh_buffer` as well (raw TLS loopback 0.055 s).
        """
        if max_bytes is not None and ref.size > max_bytes:
            raise BlobTransferError(f"blob {ref.digest[:12]} is {ref.size} bytes, over the allowed {max_bytes}")
        if ref.data is not None:  # inline in its message, checked against its digest and size at parse: no request
            return memoryview(bytearray(ref.data))
        made: list[memoryview] = []

        def allocate() -> memoryview:  # once the store has confirmed the size: ref.size is only a claim
            made.append(pool.take(ref.size) if pool is not None else fresh_buffer(ref.size))
            return made[0]

        self._receive(ref, allocate, lambda chunk: None)
        return made[0]

    def download_to(self, ref: BlobRef, path: str | Path) -> Path:
        """Stream a blob into `path` (written atomically, only once verified)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                self._receive(ref, lambda: memoryview(bytearray(min(CHUNK, ref.size))), out.write)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> FileStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _blob_url(self, key: str) -> str:
        return f"{self._api}/blobs/{key}"

    def _put_unless_readable(self, ref: BlobRef, body: bytes | Payload | BinaryIO, readers: list[str]) -> None:
        if self.exists(ref.key):
            self.grant(ref, readers)
        else:
            self._put(ref, body, readers)

    def _post(self, data: bytes | Payload, readers: list[str], hold: bool, digest: Algorithm) -> BlobRef:
        """Send `data` hashing each block on its way out; the store names the blob by what it received.

        Measured (bench/blobs.py, parameters over HTTPS, both ways in turn within each repeat, median of 5;
        2026-11-30 20:00, quiet machine: other processes 1-3 % of the CPU): 40 MB hashed while sent 0.159 s (51 % of
        raw TLS loopback, 0.081 s), hash, HEAD, then PUT 0.221 s (37 %); 160 MB 0.585 s (52 %) against 0.795 s (38 %).
        The store no longer waits while the client hashes. Both ends together use 0.233 CPU s per 40 MB upload
        against raw TLS's 0.117 (two hashes, the disk write, HTTP), so two cores cannot do it in under 0.117 s,
        69 % of raw TLS. The "ask first" HEAD saved the re-send of a blob already stored, which rounds never do:
        each update and each global model is new.
        """
        body = _HashingBody(data, digest)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)),
                   **_readers(readers, hold)}  # fmt: skip
        what = f"upload of a blob of {len(body)} bytes"
        # the store hashes the body with the digest named here (sha256 when none is: a client before BLAKE3)
        url = f"{self._api}/blobs" + ("" if digest == "sha256" else f"?digest={digest}")
        response = self._call("POST", url, what=what, ok=(200, 201), data=body, headers=headers)
        ref = BlobRef.named(digest, body.hexdigest(), len(body))
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if not isinstance(answer, dict) or answer.get(digest) != ref.digest or answer.get("size") != ref.size:
            raise BlobTransferError(f"file store {what} failed: the store answered {str(answer)[:200]}, "
                                    f"this client sent {ref.size} bytes hashing to {digest} {ref.digest}")  # fmt: skip
        self._granted.setdefault(ref.key, set()).update(readers)
        return ref

    def _put(self, ref: BlobRef, body: bytes | Payload | BinaryIO, readers: Iterable[str] = (), hold: bool = False
             ) -> None:  # fmt: skip
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(ref.size),
                   **_readers(readers, hold)}  # fmt: skip
        self._call(
            "PUT",
            self._blob_url(ref.key),
            what=f"upload of blob {ref.digest[:12]} ({ref.size} bytes)",
            ok=(200, 201),
            data=body,
            headers=headers,
        )
        self._granted.setdefault(ref.key, set()).update(readers)

    def _receive(self, ref: BlobRef, allocate: Callable[[], memoryview], sink: Callable[[memoryview], object]) -> None:
        """GET a blob into the buffer `allocate` returns (the whole blob, or a block reused for each `sink` call),
        hashing each block as it arrives; raise unless exactly `ref.size` bytes hashing to the ref's digest came.

        The buffer is made only once the store's Content-Length equals `ref.size`: a reference is another
        party's claim, and one naming a stored blob with a size of 10**13 would otherwise allocate that."""
        response = self._call("GET", self._blob_url(ref.key), what=f"download of blob {ref.digest[:12]}",
                              stream=True)
        announced = response.headers.get("Content-Length")
        if announced != str(ref.size):
            response.close()
            raise BlobTransferError(f"blob {ref.digest[:12]}: the store holds {announced or 'an unknown number of'} "
                                    f"bytes, the reference names {ref.size}; refusing it")  # fmt: skip
        buffer = allocate()
        whole = buffer.nbytes == ref.size
        # A whole-blob buffer is filled front to back, so each block can be hashed on a helper thread while the
        # next one is read and decrypted; a reused block buffer is hashed before it is overwritten.
        digest = BackgroundDigest(ref.algorithm, threaded=whole and ref.size >= BACKGROUND_HASH)
        size = 0
        with response, digest:
            readinto = _readinto(response)
            try:
                while size < ref.size:
                    start = size if whole else 0
                    block = buffer[start : start + min(CHUNK, ref.size - size, buffer.nbytes - start)]
                    n = readinto(block)
                    if not n:
                        break
                    digest.update(block[:n])
                    sink(block[:n])
                    size += n
                if size == ref.size and readinto(memoryview(bytearray(1))):  # a byte past the announced size
                    raise BlobTransferError(f"blob {ref.digest[:12]} is larger than the {ref.size} bytes announced")
                # At the body's end: this marks it read, and requests leaves the connection to the pool for the
                # next call (it closes a response it thinks unread). Nothing is left to arrive here.
                for _ in response.iter_content(CHUNK):
                    pass
            except (OSError, requests.RequestException, HTTPException) as exc:  # a timeout is an OSError
                raise BlobTransferError(
                    f"file store download of blob {ref.digest[:12]} failed after {size} of {ref.size} bytes: "
                    f"{_reason(exc) or type(exc).__name__}"
                ) from None
        self._verify(ref, size, digest.hexdigest())

    @staticmethod
    def _verify(ref: BlobRef, size: int, hexdigest: str) -> None:
        if size != ref.size:
            raise BlobTransferError(f"blob {ref.digest[:12]}: received {size} bytes, expected {ref.size}")
        if hexdigest != ref.digest:
            raise BlobTransferError(f"blob {ref.digest[:12]}: content hashes to {hexdigest[:12]} ({ref.algorithm}); "
                                    "refusing it")  # fmt: skip

    def _call(self, method: str, url: str, what: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        try:
            response = self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise BlobTransferError(
                f"file store {what} failed: no TLS connection with {self.url} ({_reason(exc)}); the server's "
                "certificate must come from the CA in these credentials, and under mutual TLS the credentials "
                "must carry this party's certificate"
            ) from None
        except requests.ConnectionError as exc:
            raise BlobTransferError(
                f"file store {what} failed: cannot reach {self.url} ({_reason(exc)}); is the network started?"
            ) from None
        except requests.Timeout:
            raise BlobTransferError(
                f"file store {what} failed: no answer from {self.url} within {self._timeout[1]:.0f}s"
            ) from None
        except requests.RequestException as exc:
            raise BlobTransferError(f"file store {what} failed: {exc}") from None
        if response.status_code not in ok:
            message = _server_message(response)
            response.close()
            if response.status_code == 404 and method in ("GET", "HEAD"):
                message += " (blobs are readable only by their uploader and the parties it names as readers)"
            raise BlobTransferError(
                f"file store {what} failed: HTTP {response.status_code}: {message}",
                status=response.status_code,
                server_message=message,
            )
        return response


def _readers(readers: Iterable[str], hold: bool) -> dict[str, str]:
    """The upload's headers naming its readers, and whether they hold it (`upload_bytes`' `hold`)."""
    names = sorted(set(readers))
    return {READERS_HEADER: ",".join(names), **({HOLD_HEADER: "1"} if hold else {})} if names else {}


def _ref(data: bytes | Payload, digest: Algorithm) -> BlobRef:
    hexdigest = digest_bytes(data, digest) if isinstance(data, (bytes, bytearray, memoryview)) else data.digest(digest)
    return BlobRef.named(digest, hexdigest, len(data))


class _HashingBody:
    """A request body that hashes each block as it is handed to the socket (`requests` sends an iterable with
    a length as it is, with that Content-Length).

        body = _HashingBody(payload, "blake3"); session.post(url, data=body); body.hexdigest()
    """

    def __init__(self, data: bytes | Payload, algorithm: Algorithm) -> None:
        self._data = data
        self._size = len(data)
        self._digest = new_digest(algorithm)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[memoryview]:
        parts = [data] if isinstance(data := self._data, (bytes, bytearray, memoryview)) else data
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, CHUNK):  # 1 MiB: hashing it takes ~1 ms, the store reads meanwhile
                block = view[start : start + CHUNK]
                self._digest.update(block)
                yield block

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _readinto(response: requests.Response) -> Callable[[memoryview], int]:
    """The response body's `readinto`: http.client's own when urllib3 exposes it (it fills the buffer from
    the socket; urllib3 2's `readinto` reads into new bytes, then copies them)."""
    fp = getattr(response.raw, "_fp", None)
    if fp is not None and hasattr(fp, "readinto") and not response.headers.get("Content-Encoding"):
        return fp.readinto
    return response.raw.readinto


def _server_message(response: requests.Response) -> str:
    if response.request.method == "HEAD":
        return response.reason or "no details"
    try:
        body = response.json()
    except ValueError:
        return (response.text or response.reason or "no details").strip()[:200]
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:200]


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "reset by peer"):
        if marker in text:
            return marker.lower()
    return text[:160]
