"""The daemon-worker wire: frames of a bounded JSON header and named byte blobs, never pickles.

The worker runs plan code, and plan code can reach the worker's end of the pipe: `Connection.recv`
would unpickle whatever it sent, in the daemon, which holds the node's credentials. So the daemon
reads only `recv_bytes(maxlength)` and parses a frame by hand:

    8 bytes: header length (little-endian) | header: UTF-8 JSON object | blob bytes, in header order

The header's `"blobs"` lists `[name, length]` pairs; their lengths must add up to the rest of the frame.
On the socket a frame travels in `multiprocessing.connection`'s framing (a 4-byte length, or -1 and an 8-byte
one), so `Connection.recv_bytes` still reads what `send_frame` writes and the other way round.

`send_frame` writes the header and each blob from its own memory (`os.writev`, no join) and `recv_frame` reads
the frame into one buffer allocated once its length is known to be within the limit; the blobs are views into
it (`decode` of a memoryview slices without copying). Measured for a 40 MB blob (the benchmark's 10 M-parameter
model) there and back on the 2-core machine at load 6 (2026-11-30, `bench/worker_wire.py`): `encode` +
`send_bytes` + `recv_bytes` + `decode` 0.248 s, `send_frame` + `recv_frame` 0.069 s.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any

from fedsilo.common.buffers import fresh_buffer
from fedsilo.common.errors import WorkerProtocolError
from fedsilo.common.safejson import JSONLimitError, loads_bounded

Buffer = bytes | bytearray | memoryview
IOV_BATCH = 512
"""Buffers per `writev` call (Linux allows 1024)."""

MAX_HEADER_BYTES = 8 * 1024 * 1024
"""A header holds a request (256 KiB at most), a plan's source (4 MiB at most) and metrics."""


def encode(header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> bytes:
    """One frame: `header` (JSON-serialisable, without a "blobs" key) and `blobs` by name."""
    import json

    blobs = blobs or {}
    head = json.dumps({**header, "blobs": [[name, len(data)] for name, data in blobs.items()]}).encode("utf-8")
    return b"".join([len(head).to_bytes(8, "little"), head, *blobs.values()])


def send_frame(fd: int, header: dict[str, Any], blobs: Mapping[str, Any] | None = None) -> None:
    """Write one frame to the socket `fd`: `header` and `blobs` by name, each blob a bytes-like object or a
    `SerializedParams` (its buffers are the tensors' memory), sent without joining them into one copy."""
    import json

    parts = {name: _buffers(data) for name, data in (blobs or {}).items()}
    sizes = {name: sum(b.nbytes for b in bufs) for name, bufs in parts.items()}
    head = json.dumps({**header, "blobs": [[name, size] for name, size in sizes.items()]}).encode("utf-8")
    head += b" " * (-(8 + len(head)) % 64)  # the first blob starts 64-byte aligned in the receiver's buffer
    total = 8 + len(head) + sum(sizes.values())
    prefix = struct.pack("!i", total) if total <= 0x7FFFFFFF else struct.pack("!iQ", -1, total)
    _write_all(fd, [memoryview(prefix + len(head).to_bytes(8, "little") + head), *(b for bufs in parts.values()
                                                                                       for b in bufs)])  # fmt: skip


def recv_frame(fd: int, max_bytes: int) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Read one frame from the socket `fd` into a buffer of its own; the blobs are writable views into it.
    `WorkerProtocolError` for a frame over `max_bytes` (nothing allocated) or one that is not a frame;
    `EOFError` when the other end closes, before or in the middle of a frame."""
    (size,) = struct.unpack("!i", _read_exact(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    if size < 0 or size > max_bytes:
        raise WorkerProtocolError(f"the worker sent a frame of {size} bytes, over the limit of {max_bytes}")
    frame = fresh_buffer(size)  # no zeroing of memory about to be overwritten (40 MB: ~4 ms a frame)
    _read_into(fd, frame)
    return decode(frame)


def _buffers(data: Any) -> list[memoryview]:
    bufs = getattr(data, "buffers", None)  # a SerializedParams: header + tensor memory
    if bufs is not None:
        return [memoryview(b).cast("B") for b in bufs]
    return [memoryview(data).cast("B")]


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    pending = [b for b in buffers if b.nbytes]
    while pending:
        written = os.writev(fd, pending[:IOV_BATCH])
        while written:  # drop what went out; a partly written buffer continues from where it stopped
            if written >= pending[0].nbytes:
                written -= pending.pop(0).nbytes
            else:
                pending[0] = pending[0][written:]
                written = 0


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray(n)
    _read_into(fd, memoryview(buf))
    return bytes(buf)


def _read_into(fd: int, view: memoryview) -> None:
    while view.nbytes:
        got = os.readv(fd, [view])
        if got == 0:
            raise EOFError("the other end closed the connection in the middle of a frame")
        view = view[got:]


def decode(frame: Buffer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, blobs) of a frame; `WorkerProtocolError` for anything that is not one. The blobs are slices of
    `frame`: views (no copy) when it is a memoryview."""
    if len(frame) < 8:
        raise WorkerProtocolError(f"a frame of {len(frame)} bytes")
    size = int.from_bytes(bytes(frame[:8]), "little")
    if size > min(len(frame) - 8, MAX_HEADER_BYTES):
        raise WorkerProtocolError(f"a frame header of {size} bytes in a frame of {len(frame)}")
    try:
        header = loads_bounded(bytes(frame[8 : 8 + size]), max_bytes=MAX_HEADER_BYTES)
    except (JSONLimitError, ValueError) as exc:
        raise WorkerProtocolError(f"a frame header that is not bounded JSON ({exc})") from None
    listed = header.get("blobs") if isinstance(header, dict) else None
    if not isinstance(listed, list) or not all(_is_entry(e) for e in listed):
        raise WorkerProtocolError("a frame header without a list of [name, length] blobs")
    blobs: dict[str, Any] = {}
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
