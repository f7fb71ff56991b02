"""uvicorn's h11 protocol, with a request body of known length handed to the application as it arrives.

Why: `perf` of the store while one client uploaded 40 MB blobs (2026-12-02, quiet machine) put 29 % of its CPU
in `memmove`, four fifths of it h11's receive buffer: every block of the body is appended to a `bytearray`
(11.5 % of the store's CPU) and sliced out of it again as a `Data` event (12.8 %); uvicorn then appends the event
to the request's `bytearray` and copies that into `bytes` for the ASGI message. Here, once h11 has parsed a
request whose body has a Content-Length and holds none of its bytes, each block the TLS layer hands over becomes
the ASGI message's body as it is (`bytes(b)` of a `bytes` is the same object): no copy between the decryption
and the store's hash and write. h11 still parses every request head, chunked bodies, whatever follows a body
on the connection, and the response; it is told how much of the body went past it, so that its state (and
keep-alive) stays exact.

That count is h11's private state (`Connection._reader`, `ContentLengthReader._remaining`,
`Connection._receive_buffer`): h11 is pinned in envs/constraints.txt, and `tests/unit/test_filestore_protocol.py`
fails if those names move.

    uvicorn.Config(app, http=BodyStreamingProtocol, ...)
"""

from __future__ import annotations

import h11
from h11._readers import ContentLengthReader
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BodyStreamingProtocol"]


class BodyStreamingProtocol(H11Protocol):
    """H11Protocol whose Content-Length bodies skip h11's buffer (see the module's docstring).

        uvicorn.Config(app, http=BodyStreamingProtocol)   # in place of http="h11"
    """

    def data_received(self, data: bytes) -> None:
        reader = self.conn._reader
        if (self.cycle is None or not isinstance(reader, ContentLengthReader) or not reader._remaining
                or self.conn.their_state is not h11.SEND_BODY or len(self.conn._receive_buffer)):  # fmt: skip
            super().data_received(data)
            return
        self._unset_keepalive_if_required()
        take = min(len(data), reader._remaining)
        body = data if take == len(data) else data[:take]
        reader._remaining -= take
        cycle = self.cycle
        if self.conn.our_state is not h11.DONE:  # as uvicorn: the body of a request already answered is dropped
            cycle.body = body if not cycle.body else cycle.body + body
            if len(cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.message_event.set()
        if reader._remaining == 0:
            if take < len(data):
                self.conn.receive_data(data[take:])  # the next request, pipelined: h11's to parse
            self.handle_events()  # h11's EndOfMessage (its reader has nothing left to count), then what followed
