"""The daemon-worker wire: frames of a bounded JSON header and named byte blobs, never pickles.

The worker runs plan code, and plan code can reach the worker's end of the pipe: `Connection.recv`
would unpickle whatever it sent, in the daemon, which holds the node's credentials. So the daemon
reads only `recv_bytes(maxlength)` and parses a frame by hand:

    8 bytes: header length (little-endian) | header: UTF-8 JSON object | blob bytes, in header order

The header's `"blobs"` lists `[name, length]` pairs; their lengths must add up to the rest of the frame.
Cost: a 40 MB frame (the benchmark's 10 M-parameter model) there and back over the socket took 0.37 s on
the shared 2-core dev machine at load 9 (2026-12, `encode` + `send_bytes` + `decode` both ways).
"""

from __future__ import annotations

from typing import Any

from fedsilo.common.errors import WorkerProtocolError
from fedsilo.common.safejson import JSONLimitError, loads_bounded

MAX_HEADER_BYTES = 8 * 1024 * 1024
"""A header holds a request (256 KiB at most), a plan's source (4 MiB at most) and metrics."""


def encode(header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> bytes:
    """One frame: `header` (JSON-serialisable, without a "blobs" key) and `blobs` by name."""
    import json

    blobs = blobs or {}
    head = json.dumps({**header, "blobs": [[name, len(data)] for name, data in blobs.items()]}).encode("utf-8")
    return b"".join([len(head).to_bytes(8, "little"), head, *blobs.values()])


def decode(frame: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(header, blobs) of a frame; `WorkerProtocolError` for anything that is not one."""
    if len(frame) < 8:
        raise WorkerProtocolError(f"a frame of {len(frame)} bytes")
    size = int.from_bytes(frame[:8], "little")
    if size > min(len(frame) - 8, MAX_HEADER_BYTES):
        raise WorkerProtocolError(f"a frame header of {size} bytes in a frame of {len(frame)}")
    try:
        header = loads_bounded(frame[8 : 8 + size], max_bytes=MAX_HEADER_BYTES)
    except (JSONLimitError, ValueError) as exc:
        raise WorkerProtocolError(f"a frame header that is not bounded JSON ({exc})") from None
    listed = header.get("blobs") if isinstance(header, dict) else None
    if not isinstance(listed, list) or not all(_is_entry(e) for e in listed):
        raise WorkerProtocolError("a frame header without a list of [name, length] blobs")
    blobs: dict[str, bytes] = {}
    position = 8 + size
    for name, length in listed:
        if name in blobs:
            raise WorkerProtocolError(f"blob {name!r} twice in one frame")
        blobs[name] = frame[position : position + length]
        position += length
    if position != len(frame):
        raise WorkerProtocolError(f"blobs cover {position} bytes of a {len(frame)}-byte frame")
    del header["blobs"]
    return header, blobs


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and type(entry[1]) is int and entry[1] >= 0)  # fmt: skip
