"""The blob API (docs/internals.md): raw-body PUT, streamed GET, HEAD, grants, health."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import FileResponse, HttpResponse, JsonResponse
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from fedsilo.common.hashing import is_sha256
from fedsilo.common.safejson import JSONLimitError, loads_bounded

from . import access
from .errors import ApiError
from .spool import HashingSpool

log = logging.getLogger(__name__)

__all__ = ["ApiError", "BlobView", "GrantView", "HealthView", "UploadView", "json_exception_handler"]

CHUNK = 1 << 20
DRAIN_LIMIT = 64 << 20
"""An over-limit body up to this size is read and discarded before answering 413: closing a socket
with unread data makes the kernel send a reset, and the client would never see the 413."""
MAX_GRANT_BODY = 64 << 10


def json_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF errors as `{"error": "..."}`."""
    response = exception_handler(exc, context)
    if response is not None:
        detail = response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
        response.data = {"error": str(detail)}
    return response


def not_found(request: Any, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse({"error": f"no such endpoint: {request.path}"}, status=404)


def server_error(request: Any) -> JsonResponse:
    return JsonResponse({"error": "internal error in the file store; see its log"}, status=500)


def _conf() -> dict[str, Any]:
    return settings.FEDSILO_FILESTORE


def _check_sha(sha256: str) -> None:
    if not is_sha256(sha256):
        raise ApiError(400, f"'{sha256[:80]}' is not a sha256 (64 lowercase hex characters)")


class HealthView(APIView):
    """`GET /api/v1/health`, without a token."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request: Any) -> Response:
        return Response({"status": "ok", "max_upload_bytes": _conf()["max_upload_bytes"]})


class BlobView(APIView):
    """`PUT|GET|HEAD|DELETE /api/v1/blobs/<sha256>`; reads only by the uploaders and the readers granted; DELETE
    releases the caller's hold on the blob, which goes once nobody holds it."""

    def head(self, request: Any, sha256: str) -> HttpResponse:
        _check_sha(sha256)
        if not access.readable(sha256, request.user.name):
            return HttpResponse(status=404)
        try:
            size = access.blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return HttpResponse(status=404)
        return HttpResponse(status=200, headers={"X-Blob-Size": str(size)})

    def get(self, request: Any, sha256: str) -> FileResponse:
        _check_sha(sha256)
        if not access.readable(sha256, request.user.name):
            raise access.not_found(sha256)
        try:
            f = open(access.blob_path(sha256), "rb")  # noqa: SIM115 - FileResponse closes it
        except FileNotFoundError:
            raise access.not_found(sha256) from None
        access.touch(sha256)  # a read keeps the blob from expiring (retention)
        response = FileResponse(f, content_type="application/octet-stream")
        response.block_size = CHUNK
        response["X-Content-SHA256"] = sha256
        return response

    def put(self, request: Any, sha256: str) -> Response:
        _check_sha(sha256)
        return _store_upload(request, sha256)

    def delete(self, request: Any, sha256: str) -> Response:
        """Release: this party no longer needs the blob (`access.release`); `removed` when no one holds it now."""
        _check_sha(sha256)
        return Response({"sha256": sha256, "removed": access.release(sha256, request.user.name)})


class UploadView(APIView):
    """`POST /api/v1/blobs`: a blob whose sha256 the client computes while it sends (the store answers it)."""

    def post(self, request: Any) -> Response:
        return _store_upload(request, None)


def _store_upload(request: Any, sha256: str | None) -> Response:
    """The body of a PUT (named `sha256`: it must hash to it) or of a POST (stored under what it hashes to)."""
    readers = access.parse_readers(request.META.get(access.READERS_HEADER, ""))
    hold = request.META.get(access.HOLD_HEADER, "") == "1"
    limit: int = _conf()["max_upload_bytes"]
    raw = request._request  # the Django request: its body has not been touched by DRF parsers
    meta = raw.META
    length_header = meta.get("CONTENT_LENGTH") or ""
    if not length_header:
        # a chunked body has arrived whole before the view runs, and asgi.py sets Content-Length to its size.
        raise ApiError(411, "send the blob as the raw request body with Content-Length or chunked encoding")
    try:
        length = int(length_header)
    except ValueError:
        raise ApiError(400, f"invalid Content-Length '{length_header}'") from None
    if length > limit:
        _drain(raw, length)
        raise ApiError(413, f"blob of {length} bytes exceeds the file store limit of {limit} bytes")

    spool = getattr(raw, "_stream", None)  # ASGIRequest keeps the body file it was given as _stream
    if isinstance(spool, HashingSpool):  # asgi.py hashed the body as it arrived: no second pass
        size, actual, tmp_name = spool.size, spool.sha256(), spool.detach()
    else:
        size, actual, tmp_name = _copy_hashed(raw, "post")
    try:
        if size != length:
            raise ApiError(400, f"body ended after {size} of {length} bytes")
        if sha256 is not None and actual != sha256:
            raise ApiError(400, f"sha256 mismatch: the body hashes to {actual}, the URL names {sha256}")
        created = access.store(actual, size, tmp_name, request.user.name, readers, hold)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)  # moved into blobs/ when stored
    return Response({"sha256": actual, "size": size}, status=201 if created else 200)


def _copy_hashed(raw: Any, prefix: str) -> tuple[int, str, str]:
    """A body not spooled by `HashingSpool` (a server without asgi.py's read_body), copied to a temp file of
    the store and hashed on the way: (size, sha256, path)."""
    fd, tmp_name = tempfile.mkstemp(dir=Path(_conf()["tmp"]), prefix=prefix + ".")
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := raw.read(CHUNK):  # HttpRequest.read() is bounded by Content-Length
                size += len(chunk)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(tmp_name)
        raise
    return size, digest.hexdigest(), tmp_name


class GrantView(APIView):
    """`POST /api/v1/blobs/<sha256>/readers` with `{"readers": [...]}`: only an uploader may grant."""

    def post(self, request: Any, sha256: str) -> Response:
        _check_sha(sha256)
        raw = request._request
        try:
            length = int(raw.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_GRANT_BODY:
            raise ApiError(400, f'send {{"readers": [...]}} as a JSON body of at most {MAX_GRANT_BODY} bytes')
        try:
            body = loads_bounded(raw.read(length), max_bytes=MAX_GRANT_BODY, max_depth=4)
        except (JSONLimitError, ValueError) as exc:
            raise ApiError(400, f"invalid JSON body: {str(exc)[:120]}") from None
        if not isinstance(body, dict) or not isinstance(body.get("readers"), list):
            raise ApiError(400, 'send {"readers": [...]}, a list of party names')
        readers = access.parse_readers(body["readers"])
        return Response({"sha256": sha256, "readers": access.grant(sha256, request.user.name, readers)})


def _drain(stream: Any, remaining: int) -> None:
    budget = min(remaining, DRAIN_LIMIT)
    while budget > 0:
        chunk = stream.read(min(CHUNK, budget))
        if not chunk:
            return
        budget -= len(chunk)
