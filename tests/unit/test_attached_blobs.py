"""A message's wire form with its inline blobs attached after the JSON (`Message.to_wire`, issue 11): the JSON
alone is signed (tests/unit/test_signed_receive.py), each ref's sha256 binds its bytes, and whatever a party with
valid credentials puts after the JSON (refs past the end, overlapping, repeated, bytes no ref names, a forged
tail) is refused with a `MessageError`, never anything else. Rounds with real daemons: tests/integration/."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.network.message_base import ATTACHED, INLINE_BLOB_BYTES, BlobRef
from fedsilo.network.messages import MAX_MESSAGE_BYTES, MessageError, TrainReply, parse_message

DATA = os.urandom(202_400)
STORED = BlobRef(sha256="b" * 64, size=9)


def _reply(**blobs: BlobRef) -> TrainReply:
    return TrainReply.for_request("req-1", "n1", job_id="j", round=0, dataset_id="d", blobs=blobs, sample_size=4,
                                  request_id="rep-1", timestamp=1.0)  # fmt: skip


def _forge(refs: dict[str, dict], tail: bytes) -> bytes:
    """A reply's wire form with `refs` as its blobs' JSON and `tail` after it, as a hostile sender writes it."""
    head = json.loads(_reply(params=STORED).to_json())
    head["blobs"] = refs
    return json.dumps(head).encode() + ATTACHED + tail


def _ref(data: bytes, at: object, size: object = None) -> dict:
    import hashlib

    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data) if size is None else size, "at": at}


def test_the_wire_form_carries_raw_bytes_after_the_json_and_parses_back_to_the_same_message() -> None:
    reply = _reply(params=BlobRef.inline(DATA), small=BlobRef.inline(b"abc"), empty=BlobRef.inline(b""),
                   stored=STORED)  # fmt: skip
    wire = reply.to_wire()
    head, _, tail = wire.partition(ATTACHED)
    assert tail == DATA + b"abc" and len(wire) < len(reply.to_json())  # raw, not base64: 3/4 of the bytes
    assert b'"stored":{"sha256":"' + b"b" * 64 + b'","size":9}' in head  # a ref without data: as before
    assert parse_message(wire) == reply and parse_message(wire).blobs["params"].data == DATA
    assert _reply(params=STORED).to_wire() == _reply(params=STORED).to_json()  # nothing inline: plain JSON
    assert parse_message(reply.to_json()) == reply  # the JSON form (base64) is still read


@pytest.mark.parametrize(
    ("refs", "tail", "reason"),
    [
        ({"params": _ref(b"abcd", 1)}, b"abcd", "past"),  # runs past the end
        ({"params": _ref(b"abcd", -1)}, b"abcd", "non-negative"),
        ({"params": _ref(b"abcd", True)}, b"abcd", "non-negative"),  # a bool is not an offset
        ({"params": _ref(b"abcd", 0.0)}, b"abcd", "non-negative"),
        ({"params": _ref(b"abcd", "0")}, b"abcd", "non-negative"),
        ({"params": _ref(b"abcd", 0, -4)}, b"abcd", "non-negative"),
        ({"params": _ref(b"abcd", 0), "other": _ref(b"abcd", 0)}, b"abcd", "overlaps"),  # one blob named twice
        ({"params": _ref(b"abcd", 0)}, b"abcdEXTRA", "no blob ref names"),  # bytes no ref names
        ({"params": _ref(b"abcd", 0)}, b"abcX", "does not hash"),  # other bytes than the ref's
        ({"params": _ref(b"abcd", 1)}, b"Xabcd", "no blob ref names"),  # a byte before the blob
        ({"params": _ref(b"abcd", 0) | {"data": "YWJjZA=="}}, b"abcd", "not both"),
        ({"params": _ref(b"abcd", 0, INLINE_BLOB_BYTES + 1)}, b"abcd", "INLINE_BLOB_BYTES"),
    ],
)
def test_a_hostile_tail_is_refused(refs: dict, tail: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason) as caught:
        parse_message(_forge(refs, tail))
    assert caught.value.sender == "n1" and caught.value.request_id == "rep-1"  # it can be answered


def test_other_bytes_under_the_same_ref_do_not_hash_to_it() -> None:
    wire = bytearray(_reply(params=BlobRef.inline(DATA)).to_wire())
    wire[-1] ^= 1
    with pytest.raises(MessageError, match="does not hash"):
        parse_message(bytes(wire))


def test_an_offset_in_a_message_without_a_tail_is_refused() -> None:
    head = json.loads(_reply(params=STORED).to_json())
    head["blobs"] = {"params": _ref(b"abcd", 0)}
    with pytest.raises(MessageError, match="has none"):
        parse_message(json.dumps(head).encode())


def test_the_limit_counts_the_tail() -> None:
    with pytest.raises(MessageError, match="limit"):
        parse_message(_forge({"params": _ref(b"abcd", 0)}, b"\0" * MAX_MESSAGE_BYTES))


@settings(max_examples=300, deadline=None)
@given(
    refs=st.dictionaries(
        st.sampled_from(["params", "a", "b"]),  # without "params" the reply is refused whatever its tail
        st.fixed_dictionaries(
            {
                "at": st.one_of(st.integers(-5, 40), st.booleans(), st.none(), st.text(max_size=3)),
                "size": st.one_of(st.integers(-5, 40), st.none()),
            }
        ),
        max_size=3,
    ),
    tail=st.binary(max_size=40),
)
def test_fuzz_a_tail_and_its_refs_give_the_blobs_or_a_message_error(refs: dict, tail: bytes) -> None:
    import hashlib

    json_refs = {}
    for name, r in refs.items():
        at, size = r["at"], r["size"]
        piece = tail[at : at + size] if isinstance(at, int) and isinstance(size, int) and at >= 0 and size >= 0 else b""
        json_refs[name] = {"sha256": hashlib.sha256(piece).hexdigest(), "size": size, "at": at}
    try:
        message = parse_message(_forge(json_refs, tail))
    except MessageError:
        return
    assert sum(len(ref.data) for ref in message.blobs.values()) == len(tail)  # each byte named once
    for name, ref in message.blobs.items():
        assert ref.data == tail[refs[name]["at"] : refs[name]["at"] + refs[name]["size"]]
