"""The daemon-worker frames on a real socket pair: sent from the blobs' own memory, received into one buffer.

The worker runs plan code, so the daemon's side is hostile-input territory: a frame over the limit is refused
before anything is allocated, a connection closed mid-frame is an EOFError, and junk is a protocol error.
"""

from __future__ import annotations

import socket
import struct
import threading
from multiprocessing.connection import Connection, Pipe

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.common.errors import WorkerProtocolError
from fedsilo.common.serialization import params_from_bytes, params_to_buffers, params_to_bytes
from fedsilo.node.workerwire import decode, encode, recv_frame, send_frame


@pytest.fixture
def pair() -> tuple[Connection, Connection]:
    a, b = Pipe()
    yield a, b
    a.close()
    b.close()


def _send_in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


def test_a_frame_round_trips_with_blobs_as_views_of_one_buffer(pair) -> None:
    a, b = pair
    params = {"w": torch.randn(1000, 300), "b": torch.arange(7, dtype=torch.int64)}
    payload = params_to_buffers(params)
    blobs = {"params": payload, "raw": b"abc", "array": bytearray(b"xyz"), "empty": b""}
    t = _send_in_thread(lambda: send_frame(a.fileno(), {"op": "result", "n": 1}, blobs))  # 1.2 MB: > socket buffer
    header, got = recv_frame(b.fileno(), 1 << 30)
    t.join()
    assert header == {"op": "result", "n": 1}
    assert {k: bytes(v) for k, v in got.items()} == {"params": params_to_bytes(params), "raw": b"abc",
                                                       "array": b"xyz", "empty": b""}  # fmt: skip
    assert all(isinstance(v, memoryview) and not v.readonly for v in got.values())
    parsed = params_from_bytes(got["params"], copy=False)
    assert torch.equal(parsed["w"], params["w"]) and torch.equal(parsed["b"], params["b"])
    frame_start = torch.frombuffer(got["params"], dtype=torch.uint8).data_ptr()
    assert frame_start % 8 == 0  # the first blob starts aligned (as the buffer): its tensors can be views
    assert frame_start <= parsed["w"].data_ptr() < frame_start + got["params"].nbytes  # a view, not a copy


def test_the_multiprocessing_framing_is_kept_both_ways(pair) -> None:
    a, b = pair
    a.send_bytes(encode({"op": "task"}, {"params": b"123"}))
    header, blobs = recv_frame(b.fileno(), 1 << 20)
    assert header == {"op": "task"} and bytes(blobs["params"]) == b"123"
    send_frame(b.fileno(), {"op": "ready"})
    assert decode(a.recv_bytes(4096)) == ({"op": "ready"}, {})


def test_a_frame_over_the_limit_is_refused_before_it_is_read(pair) -> None:
    a, b = pair
    a.send_bytes(encode({"op": "result"}, {"params": bytes(5000)}))
    with pytest.raises(WorkerProtocolError, match="over the limit of 4096"):
        recv_frame(b.fileno(), 4096)


def test_a_length_claiming_a_terabyte_allocates_nothing(pair) -> None:
    a, b = pair
    with socket.socket(fileno=a.fileno()) as s:  # the 12-byte prefix of a frame over 2 GiB, and nothing after
        s.sendall(struct.pack("!iQ", -1, 1 << 40))
        s.detach()
    with pytest.raises(WorkerProtocolError, match="1099511627776 bytes"):
        recv_frame(b.fileno(), 1 << 30)


def test_a_connection_closed_mid_frame_is_an_eof(pair) -> None:
    a, b = pair
    frame = encode({"op": "result"}, {"params": bytes(1000)})
    with socket.socket(fileno=a.fileno()) as s:
        s.sendall(struct.pack("!i", len(frame)) + frame[:500])
        s.detach()
    a.close()
    with pytest.raises(EOFError):
        recv_frame(b.fileno(), 1 << 20)


def test_a_misaligned_view_is_parsed_by_copy() -> None:
    blob = params_to_bytes({"w": torch.randn(16)})
    buf = bytearray(1) + bytearray(blob)
    parsed = params_from_bytes(memoryview(buf)[1:], copy=False)  # float32 at an odd address: copied instead
    assert torch.equal(parsed["w"], params_from_bytes(blob)["w"])
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert not start <= parsed["w"].data_ptr() < start + len(buf)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_junk_on_the_socket_is_a_protocol_error_or_an_eof(junk: bytes) -> None:
    a, b = Pipe()
    try:
        with socket.socket(fileno=a.fileno()) as s:
            s.sendall(junk)
            s.detach()
        a.close()
        try:
            header, blobs = recv_frame(b.fileno(), 1 << 16)
        except (WorkerProtocolError, EOFError):
            return
        assert isinstance(header, dict) and all(isinstance(v, memoryview) for v in blobs.values())
    finally:
        b.close()
