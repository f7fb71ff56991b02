"""The blob API (docs/internals.md): raw-body PUT, streamed GET, HEAD, grants, health."""

from __future__ import annotations

import contextlib
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

from fedsilo.common.hashing import DIGESTS, Algorithm, blob_key, new_digest, parse_blob_key
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


def _check_key(key: str) -> Algorithm:
    """The digest a blob key names (`common.hashing.blob_key`); 400 for anything else."""
    parsed = parse_blob_key(key)
    if parsed is None:
        raise ApiError(400, f"'{key[:80]}' is not a blob key: a sha256 (64 lowercase hex characters), or 'blake3-' "
                       "and a BLAKE3 (64 lowercase hex characters)")  # fmt: skip
    return parsed[0]


class HealthView(APIView):
    """`GET /api/v1/health`, without a token."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request: Any) -> Response:
        return Response({"status": "ok", "max_upload_bytes": _conf()["max_upload_bytes"]})


class BlobView(APIView):
    """`PUT|GET|HEAD|DELETE /api/v1/blobs/<key>` (a sha256, or `blake3-` and a BLAKE3); reads only by the uploaders
    and the readers granted; DELETE releases the caller's hold on the blob, which goes once nobody holds it."""

    def head(self, request: Any, key: str) -> HttpResponse:
        _check_key(key)
        if not access.readable(key, request.user.name):
            return HttpResponse(status=404)
        try:
            size = access.blob_path(key).stat().st_size
        except FileNotFoundError:
            return HttpResponse(status=404)
        return HttpResponse(status=200, headers={"X-Blob-Size": str(size)})

    def get(self, request: Any, key: str) -> FileResponse:
        _check_key(key)
        if not access.readable(key, request.user.name):
            raise access.not_found(key)
        try:
            f = open(access.blob_path(key), "rb")  # noqa: SIM115 - FileResponse closes it
        except FileNotFoundError:
            raise access.not_found(key) from None
        access.touch(key)  # a read keeps the blob from expiring (retention)
        response = FileResponse(f, content_type="application/octet-stream")
        response.block_size = CHUNK
        response["X-Blob-Key"] = key
        return response

    def put(self, request: Any, key: str) -> Response:
        _check_key(key)
        return _store_upload(request, key)

    def delete(self, request: Any, key: str) -> Response:
        """Release: this party no longer needs the blob (`access.release`); `removed` when no one holds it now."""
        _check_key(key)
        return Response({"key": key, "removed": access.release(key, request.user.name)})


class UploadView(APIView):
    """`POST /api/v1/blobs[?digest=blake3]`: a blob whose digest (sha256 unless named) the client computes while it
    sends; the store answers it and the blob's key."""

    def post(self, request: Any) -> Response:
        return _store_upload(request, None)


def _store_upload(request: Any, key: str | None) -> Response:
    """The body of a PUT (named `key`: it must hash to it) or of a POST (stored under what it hashes to, with the
    digest its query names)."""
    if key is not None:
        algorithm = _check_key(key)
    else:
        named = request._request.GET.get("digest", "sha256")
        if named not in DIGESTS:
            raise ApiError(400, f"unknown digest '{named[:40]}': one of {', '.join(DIGESTS)}")
        algorithm = named
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
    if isinstance(spool, HashingSpool) and spool.algorithm == algorithm:  # hashed as it arrived: no second pass
        size, actual, tmp_name = spool.size, spool.hexdigest(), spool.detach()
    else:
        size, actual, tmp_name = _copy_hashed(raw, "post", algorithm)
    stored = blob_key(algorithm, actual)
    try:
        if size != length:
            raise ApiError(400, f"body ended after {size} of {length} bytes")
        if key is not None and stored != key:
            raise ApiError(400, f"{algorithm} mismatch: the body hashes to {actual}, the URL names {key}")
        created = access.store(stored, size, tmp_name, request.user.name, readers, hold)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)  # moved into blobs/ when stored
    return Response({"key": stored, algorithm: actual, "size": size}, status=201 if created else 200)


def _copy_hashed(raw: Any, prefix: str, algorithm: Algorithm) -> tuple[int, str, str]:
    """A body not spooled by `HashingSpool` with `algorithm` (a server without asgi.py's read_body), copied to a
    temp file of the store and hashed on the way: (size, hex digest, path)."""
    fd, tmp_name = tempfile.mkstemp(dir=Path(_conf()["tmp"]), prefix=prefix + ".")
    try:
        digest = new_digest(algorithm)
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
    """`POST /api/v1/blobs/<key>/readers` with `{"readers": [...]}`: only an uploader may grant."""

    def post(self, request: Any, key: str) -> Response:
        _check_key(key)
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
        return Response({"key": key, "readers": access.grant(key, request.user.name, readers)})


def _drain(stream: Any, remaining: int) -> None:
    budget = min(remaining, DRAIN_LIMIT)
    while budget > 0:
        chunk = stream.read(min(CHUNK, budget))
        if not chunk:
            return
        budget -= len(chunk)
