"""The blob API (docs/internals.md): streamed raw-body PUT, streamed GET, HEAD, health."""

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
from rest_framework import exceptions
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from fedsilo.common.hashing import is_sha256

from .models import Blob

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DRAIN_LIMIT = 64 << 20
"""An over-limit body up to this size is read and discarded before answering 413: closing a socket
with unread data makes the kernel send a reset, and the client would never see the 413."""


class ApiError(exceptions.APIException):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status


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


def blob_path(sha256: str) -> Path:
    return Path(_conf()["blobs"]) / sha256[:2] / sha256


def _check_sha(sha256: str) -> None:
    if not is_sha256(sha256):
        raise ApiError(400, f"'{sha256[:80]}' is not a sha256 (64 lowercase hex characters)")


class HealthView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request: Any) -> Response:
        return Response({"status": "ok", "max_upload_bytes": _conf()["max_upload_bytes"]})


class BlobView(APIView):
    def head(self, request: Any, sha256: str) -> HttpResponse:
        _check_sha(sha256)
        try:
            size = blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return HttpResponse(status=404)
        return HttpResponse(status=200, headers={"X-Blob-Size": str(size)})

    def get(self, request: Any, sha256: str) -> FileResponse:
        _check_sha(sha256)
        try:
            f = open(blob_path(sha256), "rb")  # noqa: SIM115 - FileResponse closes it
        except FileNotFoundError:
            raise ApiError(404, f"no blob {sha256} in the file store") from None
        response = FileResponse(f, content_type="application/octet-stream")
        response.block_size = CHUNK
        response["X-Content-SHA256"] = sha256
        return response

    def put(self, request: Any, sha256: str) -> Response:
        _check_sha(sha256)
        limit: int = _conf()["max_upload_bytes"]
        raw = request._request  # the Django request: its body has not been touched by DRF parsers
        meta = raw.META
        length_header = meta.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower()
        if length_header:
            try:
                length = int(length_header)
            except ValueError:
                raise ApiError(400, f"invalid Content-Length '{length_header}'") from None
            stream = raw  # HttpRequest.read() is bounded by Content-Length
        elif chunked:
            # Django reads nothing without Content-Length; gunicorn's input de-chunks and ends at EOF.
            length, stream = -1, meta["wsgi.input"]
        else:
            raise ApiError(411, "send the blob as the raw request body with Content-Length or chunked encoding")
        if length > limit:
            _drain(stream, length)
            raise ApiError(413, f"blob of {length} bytes exceeds the file store limit of {limit} bytes")

        tmp_dir = Path(_conf()["tmp"])
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=sha256[:12] + ".")
        committed = False
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        _drain(stream, length - size if length >= 0 else DRAIN_LIMIT)
                        raise ApiError(413, f"blob exceeds the file store limit of {limit} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if length >= 0 and size != length:
                raise ApiError(400, f"body ended after {size} of {length} bytes")
            actual = digest.hexdigest()
            if actual != sha256:
                raise ApiError(400, f"sha256 mismatch: the body hashes to {actual}, the URL names {sha256}")
            final = blob_path(sha256)
            existed = final.exists()
            if not existed:
                final.parent.mkdir(exist_ok=True)
                # No fsync: blobs are content-addressed and the uploader keeps its copy until the round ends.
                os.replace(tmp_name, final)
                committed = True
                # INSERT OR IGNORE: the first uploader is recorded, as get_or_create would, in one statement.
                Blob.objects.bulk_create(
                    [Blob(sha256=sha256, size=size, uploaded_by=request.user.name)], ignore_conflicts=True
                )
        finally:
            if not committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
        return Response({"sha256": sha256, "size": size}, status=200 if existed else 201)


def _drain(stream: Any, remaining: int) -> None:
    budget = min(remaining, DRAIN_LIMIT)
    while budget > 0:
        chunk = stream.read(min(CHUNK, budget))
        if not chunk:
            return
        budget -= len(chunk)
