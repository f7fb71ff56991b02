"""The file store as an ASGI application (served by uvicorn with TLS, `serve.py`).

Django's own `ASGIHandler` reads a request body on the event loop before any view runs (a slow
uploader holds a coroutine, not a thread) but, for this store, needs three changes:

- a body limit: it reads any body whole. Here a Content-Length over `max_body` is answered 413 before
  a byte is read, and a chunked body that passes it is cut off with the same 413;
- chunked uploads get the Content-Length of what arrived (the view refuses a body without one, 411),
  as waitress did before;
- file responses are streamed from disk a block at a time. Django consumes a synchronous iterator
  whole (`list(...)`) before sending it, which would hold a whole blob (up to 1 GiB) in memory per download;
- views run on a few long-lived threads that keep their SQLite connections (`workers.py`), not on a new
  thread per request; on lifespan shutdown each thread closes its connection.

    app = create_asgi_app(netdir, max_body=cfg.max_upload_bytes + BODY_SLACK)
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.http import FileResponse

from .spool import read_body_hashed, upload_digest
from .workers import WorkerThreads
from .wsgi import configure

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BLOCK = 1 << 20
UPLOAD_PATH = "/api/v1/blobs"
"""POST here: a blob whose digest the store computes (views.UploadView); its body is spooled as a PUT's."""

log = logging.getLogger("fedsilo.network.filestore")


class BodyTooLarge(Exception):
    """The request body passed the store's limit while it arrived."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


BODY_METHODS = frozenset({"PUT", "POST", "PATCH"})


def _party(scope: Scope) -> Any:
    from .auth import party_for  # imported once Django is configured (create_asgi_app)

    return party_for(_header(scope, b"authorization"))


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


async def _json(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FileStoreHandler(ASGIHandler):
    """Django's ASGI handler with a body limit, Content-Length for chunked bodies and streamed file responses.

        uvicorn.run(FileStoreHandler(max_body=1 << 30), ssl_certfile=..., ssl_keyfile=...)   # after configure(netdir)
    """

    def __init__(self, max_body: int, workers: WorkerThreads | None = None) -> None:
        super().__init__()
        self.max_body = max_body
        self.workers = workers or WorkerThreads()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await _plain(send, 413, f"request body of {length} bytes is over the file store's limit")
            return
        received = 0

        async def bounded() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge()
            return message

        upload = scope.get("method") == "PUT" or (scope.get("method") == "POST" and scope.get("path") == UPLOAD_PATH)
        if scope.get("method") in BODY_METHODS and _party(scope) is None:
            # before a byte of the body is read: a party without a valid token gets nothing spooled to the
            # store's disk (Django's authentication runs only once the whole body has arrived)
            await _json(send, 401, "invalid token; send 'Authorization: Token <token>' with the token from your "
                        "credentials file", [(b"www-authenticate", b"Token")])  # fmt: skip
            return
        bounded.blob_put = upload_digest(scope) if upload else None  # type: ignore[attr-defined] # read_body hashes
        try:
            # Django's own ThreadSensitiveContext() inside finds this one set and leaves it: the view runs on
            # a worker thread of the store, not on a thread started for this request.
            async with ThreadSensitiveContext(executor=self.workers.for_request()):
                await super().__call__(scope, bounded, send)
        except BodyTooLarge:
            await _plain(send, 413, f"request body over the file store's limit of {self.max_body} bytes")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI lifespan (serve.py turns it on): on shutdown the worker threads close their connections.
        uvicorn re-raises SIGTERM once it has stopped, so code after `server.run()` never runs."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                closed = await asyncio.to_thread(self.workers.close)
                log.info("file store stopped: %d of %d worker threads closed their database connection",
                         closed, self.workers.count)  # fmt: skip
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def read_body(self, receive: Receive) -> Any:
        algorithm = getattr(receive, "blob_put", None)
        if algorithm is not None:  # an upload: hashed as it arrives, into the file the store keeps
            from django.conf import settings

            return await read_body_hashed(receive, Path(settings.FEDSILO_FILESTORE["tmp"]), algorithm)
        return await super().read_body(receive)

    def create_request(self, scope: Scope, body_file: Any) -> tuple[Any, Any]:
        request, error = super().create_request(scope, body_file)
        if request is not None and not request.META.get("CONTENT_LENGTH"):
            chunked = any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in scope.get("headers", ()))
            if chunked:
                body_file.seek(0, 2)
                request.META["CONTENT_LENGTH"] = str(body_file.tell())
                body_file.seek(0)
        return request, error

    async def send_response(self, response: Any, send: Send) -> None:
        stream = getattr(response, "file_to_stream", None) if isinstance(response, FileResponse) else None
        if stream is None:
            await super().send_response(response, send)
            return
        headers = [(str(k).encode("ascii"), str(v).encode("latin1")) for k, v in response.items()]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        # A block read from the page cache takes ~0.1 ms: read on the loop rather than hop to a thread per
        # block. `send` waits while the client's socket is full, so a reader that stalls holds no memory.
        while block := stream.read(BLOCK):
            await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body"})


def create_asgi_app(netdir: str | Path, max_body: int) -> FileStoreHandler:
    """Configure Django from the network directory, apply migrations, return the ASGI application."""
    configure(netdir)
    from django.db import connections
    from django.db.backends.signals import connection_created
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - import the URLconf (views, DRF) now, not on the first request
    from django.conf import settings

    tempfile.tempdir = str(settings.FEDSILO_FILESTORE["tmp"])  # bodies over 2.5 MiB spool to the store's disk
    connections.close_all()  # migrations' connection: the loop's thread never queries, the workers do
    workers = WorkerThreads()
    connection_created.connect(workers.connection_opened, weak=False)
    return FileStoreHandler(max_body, workers)
