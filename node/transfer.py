"""What the daemon moves between the file store and a round: the worker that runs plan code opens no
connection and holds no token, so every download and upload of a round happens here.

    source = fetch_plan_source(files, request.plan)          # verified: sha256, UTF-8
    blobs = fetch_blobs(files, request.blobs)                 # verified: sha256 and size (the client's check)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.common.errors import PlanHashMismatch, PlanNotText
from fedsilo.common.hashing import sha256_bytes
from fedsilo.network.messages import BlobRef

if TYPE_CHECKING:  # the client pulls in requests; the daemon's message handlers import this module early
    from fedsilo.network.filestore_client import FileStoreClient

MAX_PLAN_BYTES = 4 * 1024 * 1024
"""A plan is source text: 4 MiB is a hundred times the largest plan seen (the benchmark's, 6 KiB)."""


def fetch_plan_source(files: FileStoreClient, ref: BlobRef) -> str:
    """The plan's source, downloaded and checked: `TransferError`, `PlanHashMismatch` or `PlanNotText`."""
    raw = files.download_bytes(ref, max_bytes=MAX_PLAN_BYTES)
    if sha256_bytes(raw) != ref.sha256:
        raise PlanHashMismatch(f"plan content does not hash to {ref.sha256}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanNotText("plan source is not UTF-8 text") from exc


def fetch_blobs(files: FileStoreClient, refs: dict[str, BlobRef]) -> dict[str, bytearray]:
    """Every blob of a request, by name; `download_buffer` verifies each one's sha256 and size.

    Buffers the daemon owns, filled from the socket: `download_bytes` would copy each once more (40 MB: 0.14 s
    measured at load 10) only for the worker's frame to copy it again."""
    return {name: files.download_buffer(ref) for name, ref in refs.items()}


def upload_blobs(files: FileStoreClient, blobs: dict[str, bytes], reader: str) -> dict[str, BlobRef]:
    """Upload a reply's blobs, readable by `reader` (the researcher answered)."""
    return {name: files.upload_bytes(data, readers=[reader]) for name, data in blobs.items()}
