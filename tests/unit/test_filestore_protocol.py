"""`network/filestore/protocol.py`: uvicorn's h11 protocol with Content-Length bodies handed past h11's buffer.

Differential: the same bytes on a connection, cut at any points (hypothesis), must give the application the same
bodies and the client the same answers through `BodyStreamingProtocol` as through uvicorn's own `H11Protocol`:
bodies of any length, a request pipelined right behind a body, a chunked body, a body longer than announced, a
body that goes on after its request was answered, a connection cut mid-body. The protocols, h11 and the ASGI
application are real; the transport is a recording stand-in for the socket (the far side).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from fedsilo.network.filestore.protocol import BodyStreamingProtocol


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it asked to pause reading or to close."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.pauses += not self.paused
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 443)}.get(name, default)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers `/early` at once without reading its body; anything else with the sha256 and size of its body."""
    if scope["path"] == "/early":
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no"})
        return
    digest, size, more = hashlib.sha256(), 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        assert isinstance(message["body"], bytes)  # ASGI's type, whichever path the bytes took
        digest.update(message["body"])
        size += len(message["body"])
        more = message.get("more_body", False)
    answer = f"{scope['method']} {scope['path']} {size} {digest.hexdigest()}".encode()
    headers = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


async def _serve(protocol: type[H11Protocol], pieces: list[bytes], cut: bool) -> tuple[bytes, bool, int]:
    """What the client got, whether the server closed, and how often it paused reading (uvicorn's flow control:
    a protocol that never resumes stalls here, as a socket would)."""
    loop = asyncio.get_running_loop()
    config = Config(app=app, http=protocol, lifespan="off", log_config=None, access_log=False)
    server = protocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = Transport()
    server.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces:
        for _ in range(1000):  # a paused transport delivers nothing until the application has read
            if not transport.paused:
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("reading stayed paused: the application was never woken to read the body")
        if transport.closed:
            break
        server.data_received(piece)
        await asyncio.sleep(0)
    if cut:
        server.connection_lost(None)
    for _ in range(50):
        await asyncio.sleep(0)
    for task in list(server.tasks):
        await asyncio.wait_for(task, 5)
    return bytes(transport.written), transport.closed, transport.pauses


def _run(protocol: type[H11Protocol], pieces: list[bytes], cut: bool) -> tuple[bytes, bool, int]:
    """`_serve` on its own event loop, in a thread: the GUI tests' Playwright leaves a loop running in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _serve(protocol, pieces, cut)).result()


def _request(method: str, path: str, body: bytes, *, length: int | None = None, chunked: bool = False) -> bytes:
    if chunked:
        parts = [body[i : i + 7000] for i in range(0, len(body), 7000)]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
        return f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks
    announced = len(body) if length is None else length
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}\r\n\r\n".encode() + body


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _both(stream: bytes, points: list[int], cut: bool = False) -> tuple[tuple[bytes, bool, int], ...]:
    pieces = _cut(stream, points)
    return _run(H11Protocol, pieces, cut), _run(BodyStreamingProtocol, pieces, cut)


bodies = st.binary(max_size=3000).map(lambda b: b * 40)  # up to 120 kB, past uvicorn's 64 KiB high-water mark
points = st.lists(st.integers(min_value=0, max_value=10**6), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=bodies, second=bodies, points=points)
def test_bodies_and_pipelined_requests_read_as_uvicorns_own(first: bytes, second: bytes, points: list[int]) -> None:
    stream = (_request("POST", "/a", first) + _request("GET", "/b", b"") + _request("PUT", "/c", second, chunked=True)
              + _request("POST", "/early", first) + _request("POST", "/d", second))  # fmt: skip
    plain, streaming = _both(stream, points)
    assert streaming == plain
    assert plain[0].count(b"HTTP/1.1 ") == 5
    assert f"POST /d {len(second)} {hashlib.sha256(second).hexdigest()}".encode() in streaming[0]


@settings(max_examples=30, deadline=None)
@given(body=bodies, extra=st.binary(min_size=1, max_size=50), points=points)
def test_bytes_past_the_announced_length_are_h11s_to_refuse(body: bytes, extra: bytes, points: list[int]) -> None:
    plain, streaming = _both(_request("POST", "/a", body) + extra, points)
    assert streaming == plain


@settings(max_examples=30, deadline=None)
@given(body=bodies.filter(len), points=points)
def test_a_connection_cut_mid_body_is_a_disconnect(body: bytes, points: list[int]) -> None:
    stream = _request("POST", "/a", body, length=len(body) + 100)
    plain, streaming = _both(stream, points, cut=True)
    assert streaming == plain
    assert b"HTTP/1.1 200" not in streaming[0]


def test_a_large_body_goes_past_h11s_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the protocol: h11 sees the request's head, not the 1 MB body behind its first block; and
    uvicorn's flow control still holds: blocks of 150 kB each pause reading until the application has read."""
    fed: list[int] = []
    original = h11.Connection.receive_data

    def counted(self: h11.Connection, data: bytes) -> None:
        fed.append(len(data))
        original(self, data)

    monkeypatch.setattr(h11.Connection, "receive_data", counted)
    body = bytes(range(256)) * 4096
    stream = _request("POST", "/a", body)
    pieces = [stream[i : i + 150_000] for i in range(0, len(stream), 150_000)]
    written, _, pauses = _run(BodyStreamingProtocol, pieces, cut=False)
    assert f"POST /a {len(body)} {hashlib.sha256(body).hexdigest()}".encode() in written
    assert sum(fed) == 150_000  # the first block only
    assert pauses == len(pieces)


def test_h11s_private_names_the_protocol_counts_with_are_there() -> None:
    """An h11 upgrade that moves them makes this fail (the pin in envs/constraints.txt keeps them)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert conn._reader._remaining == 5 and len(conn._receive_buffer) == 0  # type: ignore[union-attr]


def test_the_store_serves_with_it(tmp_path: Any) -> None:
    from fedsilo.network.filestore.serve import uvicorn_options
    from fedsilo.network.provision import NetworkConfig

    assert uvicorn_options(NetworkConfig(tls=False), tmp_path)["http"] is BodyStreamingProtocol
