"""Small blobs inline in the messages (`BlobRef.data`, issue 11): checked once at parse, standard base64 only,
within `INLINE_BLOB_BYTES`, under a message limit derived from it; used without a file-store request; left out
of whatever is kept. The round trips with real daemons are in tests/integration/test_inline_rounds.py."""

from __future__ import annotations

import base64
import hashlib
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedsilo.common.errors import TransferError
from fedsilo.common.hashing import digest_bytes
from fedsilo.common.processes import free_port
from fedsilo.common.serialization import params_to_bytes
from fedsilo.network.credentials import FileStoreSettings
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.message_base import INLINE_BLOB_BYTES, BlobRef, b64_length, inline_bytes
from fedsilo.network.messages import (
    MAX_MESSAGE_BYTES,
    MessageError,
    SearchRequest,
    TrainReply,
    TrainRequest,
    parse_message,
)
from fedsilo.node.tasks import TaskQueue
from fedsilo.node.transfer import fetch_blobs, lean_request
from fedsilo.researcher.fetch import UpdateLoader
from fedsilo.researcher.requests import Requests

MODEL = {"weight": torch.arange(8, dtype=torch.float32).reshape(2, 4), "bias": torch.ones(2)}
BLOB = params_to_bytes(MODEL)


def _reply(ref: BlobRef) -> TrainReply:
    return TrainReply.for_request("req-1", "n1", job_id="j", round=0, dataset_id="d", blobs={"params": ref},
                                  sample_size=4, request_id="rep-1", timestamp=1.0)  # fmt: skip


def _request(ref: BlobRef) -> TrainRequest:
    plan = BlobRef(sha256="a" * 64, size=10)
    return TrainRequest(sender="r", job_id="j", round=0, dataset_id="d", plan=plan, plan_name="P",
                        blobs={"params": ref})  # fmt: skip


@pytest.fixture
def dead_store() -> FileStoreClient:
    """A client of a store that is not there: any request it makes fails (`TransferError`)."""
    client = FileStoreClient(FileStoreSettings(url=f"http://127.0.0.1:{free_port()}", token="t"))
    yield client
    client.close()


# ------------------------------------------------------------------ the wire form
def test_an_inline_ref_is_standard_base64_and_a_ref_without_data_dumps_as_before() -> None:
    ref = BlobRef.inline(BLOB)
    assert ref.blake3 == digest_bytes(BLOB, "blake3") and ref.size == len(BLOB) and ref.sha256 is None
    wire = _reply(ref).to_json()
    assert f'"data":"{base64.b64encode(BLOB).decode()}"'.encode() in wire  # no newline, standard alphabet
    back = parse_message(wire)
    assert back.params.data == BLOB and back.params == ref
    plain = BlobRef(blake3=ref.blake3, size=ref.size)
    assert plain.model_dump_json() == f'{{"blake3":"{ref.blake3}","size":{ref.size}}}'
    assert parse_message(_reply(plain).to_json()).params.data is None
    sha = hashlib.sha256(BLOB).hexdigest()  # a ref by sha256 dumps as every ref did before BLAKE3
    assert BlobRef(sha256=sha, size=ref.size).model_dump_json() == f'{{"sha256":"{sha}","size":{ref.size}}}'
    assert parse_message(_reply(BlobRef.inline(BLOB, "sha256")).to_json()).params.data == BLOB


def test_the_kept_forms_leave_the_data_out() -> None:
    ref = BlobRef.inline(BLOB)
    reply = _reply(ref)
    lean = reply.to_json(inline=False)
    assert b'"data"' not in lean and parse_message(lean).params == ref.lean()
    assert inline_bytes(reply) == len(BLOB) and inline_bytes(parse_message(lean)) == 0
    assert "data" not in repr(ref) and str(BLOB[:16]) not in repr(reply)  # logs never print the bytes
    request = _request(ref)
    assert lean_request(request).params == ref.lean() and inline_bytes(lean_request(request)) == 0
    plain = _request(ref.lean())
    assert lean_request(plain) is plain  # nothing to strip: the same object


PADDED = bytes(range(256)) * 3 + b"\xfb"  # 769 bytes: its base64 ends in "+w==" and holds "+" and "/"
B64 = base64.b64encode(PADDED).decode()
assert B64.endswith("==") and B64[-3] == "w" and "+" in B64 and "/" in B64


def _tampered(old: str, new: str) -> bytes:
    wire = _reply(BlobRef.inline(PADDED)).to_json().decode()
    assert old in wire
    return wire.replace(old, new, 1).encode()


HOSTILE = {  # name -> (the payload, what the reason must say)
    "hash_disagrees": (_tampered(B64, base64.b64encode(b"\1" + PADDED[1:]).decode()), "does not hash to"),
    "shorter_than_size": (_tampered(B64, base64.b64encode(PADDED[:-3]).decode()), "the ref says size"),
    "longer_than_size": (_tampered(B64, base64.b64encode(PADDED + b"\0\0\0").decode()), "the ref says size"),
    "newline": (_tampered(B64, B64[:76] + "\\n" + B64[76:]), "not standard base64"),
    "url_safe_alphabet": (_tampered(B64, B64.replace("+", "-").replace("/", "_")), "not standard base64"),
    "no_padding": (_tampered(B64, B64.rstrip("=")), "not standard base64"),
    "not_ascii": (_tampered(B64, "\u00e9" + B64[1:]), "not standard base64"),
    "padding_bits_set": (_tampered(B64, B64[:-3] + "x=="), "not canonical"),  # decodes to the same bytes
    "not_a_string": (_tampered(f'"{B64}"', "12345"), "data"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_inline_data_that_disagrees_with_its_ref_or_is_not_base64_is_refused_at_parse(case: str) -> None:
    payload, reason = HOSTILE[case]
    with pytest.raises(MessageError) as err:
        parse_message(payload)
    assert err.value.field == "blobs.params.data" and reason in err.value.reason
    assert err.value.sender == "n1" and err.value.request_id  # answerable: the ids come before the data
    assert B64[:40] not in err.value.reason  # the reason quotes no data


@pytest.mark.parametrize("extra", [1, 4])  # 1: the same base64 length, refused once decoded; 4: before decoding
def test_a_blob_over_the_inline_limit_is_refused_in_json_and_in_python(extra: int) -> None:
    big = os.urandom(INLINE_BLOB_BYTES + extra)
    wire = _reply(BlobRef.inline(big[:INLINE_BLOB_BYTES])).to_json().decode()
    wire = wire.replace(base64.b64encode(big[:INLINE_BLOB_BYTES]).decode(), base64.b64encode(big).decode())
    wire = wire.replace(f'"size":{INLINE_BLOB_BYTES}', f'"size":{len(big)}')
    assert len(wire) < MAX_MESSAGE_BYTES  # under the message limit, over the blob's
    with pytest.raises(MessageError, match="over 524288") as err:
        parse_message(wire.encode())
    assert err.value.field == "blobs.params.data"
    with pytest.raises(ValidationError, match="INLINE_BLOB_BYTES"):
        BlobRef(sha256=hashlib.sha256(big).hexdigest(), size=len(big), data=big)
    with pytest.raises(ValueError, match="INLINE_BLOB_BYTES"):
        BlobRef.inline(big)


def test_the_message_limit_admits_a_full_inline_blob_and_refuses_a_byte_more() -> None:
    assert b64_length(INLINE_BLOB_BYTES) + 256 * 1024 == MAX_MESSAGE_BYTES
    full = _reply(BlobRef.inline(os.urandom(INLINE_BLOB_BYTES))).to_json()
    assert len(full) < MAX_MESSAGE_BYTES and len(parse_message(full).params.data) == INLINE_BLOB_BYTES
    wire = SearchRequest(sender="r", tags=["x" * 10]).to_json()
    over = wire[:-1] + b" " * (MAX_MESSAGE_BYTES - len(wire) + 1) + b"}"  # valid JSON, one byte too long
    assert len(over) == MAX_MESSAGE_BYTES + 1
    with pytest.raises(MessageError, match=r"^refused: "):  # by its size, before any parser ran
        parse_message(over)
    assert parse_message(over[: -2] + b"}").kind == "search_request"  # at the limit it parses


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2048), st.data())
def test_fuzz_an_inline_ref_parses_to_its_own_data_or_is_refused(data: bytes, draw: st.DataObject) -> None:
    wire = bytearray(_reply(BlobRef.inline(data)).to_json())
    start = wire.index(b'"data":"') + 8
    end = wire.index(b'"', start)
    assert parse_message(bytes(wire)).params.data == data
    if end > start:  # flip one byte of the base64 text to anything
        at = draw.draw(st.integers(start, end - 1))
        wire[at] = draw.draw(st.integers(0, 255))
    try:
        ref = parse_message(bytes(wire)).params
    except MessageError:
        return
    assert ref.data == data  # anything accepted is exactly the data the ref names


# ------------------------------------------------------------------ used without a request
def test_the_node_and_the_researcher_take_inline_blobs_without_any_request(dead_store: FileStoreClient) -> None:
    ref = BlobRef.inline(BLOB)
    blobs = fetch_blobs(dead_store, {"params": ref})
    assert blobs["params"] == BLOB and isinstance(blobs["params"], memoryview)  # a buffer of its own, as downloaded
    assert not blobs["params"].readonly
    loaded = UpdateLoader(MODEL, max_bytes=2 * len(BLOB))(dead_store, _reply(ref))
    assert all(torch.equal(loaded["params"][k], MODEL[k]) for k in MODEL)
    with pytest.raises(TransferError):  # the same ref without data: a request, which fails here
        fetch_blobs(dead_store, {"params": ref.lean()})
    with pytest.raises(TransferError, match="over the allowed"):  # an inline blob still has the download's bound
        UpdateLoader(MODEL, max_bytes=len(BLOB) - 1)(dead_store, _reply(ref))


def test_a_request_with_inline_blobs_is_never_broadcast() -> None:
    msg = _request(BlobRef.inline(BLOB))
    with pytest.raises(ValueError, match="never to all"):
        Requests.send(object.__new__(Requests), None, None, msg)  # type: ignore[arg-type]  # refused before use


# ------------------------------------------------------------------ what the node keeps
def test_the_queue_keeps_inline_replies_for_the_latest_tasks_only_and_no_answered_request(tmp_path) -> None:
    from fedsilo.node.tasks import FULL_REPLIES_KEPT

    q, data = TaskQueue(tmp_path / "q"), os.urandom(300_000)
    try:
        full, lean = {}, {}
        for i in range(FULL_REPLIES_KEPT + 8):
            rid = f"r{i}"
            request = _request(BlobRef.inline(data)).model_copy(update={"request_id": rid})
            assert q.put(rid, {"request": request.model_dump_json(), "reply_to": "r", "signature": ""})
            reply = _reply(BlobRef.inline(data)).model_copy(update={"in_reply_to": rid})
            full[rid], lean[rid] = reply.to_json(), reply.to_json(inline=False)
            q.done(q.get(threading.Event()), full[rid], lean[rid])
        assert q.reply("r0") == lean["r0"] and q.reply("r7") == lean["r7"]  # older: the refs only
        assert all(q.reply(f"r{i}") == full[f"r{i}"] for i in range(8, FULL_REPLIES_KEPT + 8))  # re-sent copies
        assert q.reply("r9") is not None and q.seen("r0") == "done"
        rows = q._q._getter.execute(f"SELECT count(*) FROM {q._q._table_name}").fetchone()[0]
        assert rows == 0  # answered requests (each with its 400 KB of base64) are gone from the queue
        kept = q._seen.execute("SELECT count(full_reply), sum(length(full_reply)) FROM seen").fetchone()
        latest = sum(len(full[f"r{i}"]) for i in range(8, FULL_REPLIES_KEPT + 8))
        assert kept == (FULL_REPLIES_KEPT, latest)  # bounded: not every round's update
        assert q.put("plain", ITEM)
        q.done(q.get(threading.Event()), b"plain-reply")
        assert q.reply("plain") == b"plain-reply"  # a reply without inline blobs is kept as it was
    finally:
        q.close()


ITEM = {"request": "{}", "reply_to": "researcher", "signature": ""}
