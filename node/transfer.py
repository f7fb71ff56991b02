"""What the daemon moves between the file store and a round: the worker that runs plan code opens no
connection and holds no token, so every download and upload of a round happens here.

    source = fetch_plan_source(files, request.plan)          # verified: sha256, UTF-8
    blobs = fetch_blobs(files, request.blobs)                 # verified: digest and size (the client's check)
    refs = upload_blobs(files, worker_blobs, researcher)      # small ones inline in the reply, not uploaded

Small blobs travel inline in the messages (`BlobRef.data`, at most `INLINE_BLOB_BYTES`; checked against the
ref's digest and size when the message was parsed): no request to the store for them either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedsilo.common.errors import PlanHashMismatch, PlanNotText
from fedsilo.common.hashing import sha256_bytes
from fedsilo.network.message_base import INLINE_BLOB_BYTES
from fedsilo.network.messages import BlobRef, TaskRequest

if TYPE_CHECKING:  # the client pulls in requests; the daemon's message handlers import this module early
    from fedsilo.network.filestore_client import FileStoreClient

MAX_PLAN_BYTES = 4 * 1024 * 1024
"""A plan is source text: 4 MiB is a hundred times the largest plan seen (the benchmark's, 6 KiB)."""


def fetch_plan_source(files: FileStoreClient, ref: BlobRef) -> str:
    """The plan's source, downloaded and checked: `TransferError`, `PlanHashMismatch` or `PlanNotText`."""
    if ref.sha256 is None:  # `messages.PlanRef` refuses it on receipt; the approval is of a sha256
        raise PlanHashMismatch(f"a plan is named by its sha256, this one by {ref.algorithm}")
    raw = files.download_bytes(ref, max_bytes=MAX_PLAN_BYTES)
    if sha256_bytes(raw) != ref.sha256:
        raise PlanHashMismatch(f"plan content does not hash to {ref.sha256}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanNotText("plan source is not UTF-8 text") from exc


def fetch_blobs(files: FileStoreClient, refs: dict[str, BlobRef]) -> dict[str, memoryview]:
    """Every blob of a request, by name; `download_buffer` verifies each one's digest and size, and copies an
    inline one out of its ref without a request (checked when the message was parsed).

    Buffers the daemon owns, filled from the socket: `download_bytes` would copy each once more (40 MB: 0.14 s
    measured at load 10) only for the worker's frame to copy it again."""
    return {name: files.download_buffer(ref) for name, ref in refs.items()}


def upload_blobs(files: FileStoreClient, blobs: dict[str, Any], reader: str) -> dict[str, BlobRef]:
    """A reply's blobs as refs: inline while their total stays within `INLINE_BLOB_BYTES` (the message limit
    admits that much), the others uploaded, readable by `reader` (the researcher answered). An inline reply
    goes on the topic only that researcher reads (the broker's ACL), as the store's `readers` did for an upload.
    `blobs`: bytes, a memoryview or a `SerializedParams`."""
    refs, room = {}, INLINE_BLOB_BYTES
    for name, data in blobs.items():
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size <= room:
            refs[name] = BlobRef.inline(data.tobytes() if hasattr(data, "tobytes") else data)
            room -= size
        else:
            refs[name] = files.upload_bytes(data, readers=[reader], hold=True)  # the researcher's until it has read it
    return refs


def lean_request(request: TaskRequest) -> TaskRequest:
    """`request` with its blobs' inline data left out (itself when it has none): once the data is taken, what
    is handed on (the worker's header) or kept carries refs only."""
    if not any(ref.data is not None for ref in request.blobs.values()):
        return request
    return request.model_copy(update={"blobs": {name: ref.lean() for name, ref in request.blobs.items()}})
