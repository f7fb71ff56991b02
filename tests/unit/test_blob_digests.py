"""Blob refs named by BLAKE3 or sha256 (`network.message_base.BlobRef`): exactly one digest, inline data checked
with the ref's own, plans by sha256 only, and what a hostile sender can put in a ref refused with the field named."""

from __future__ import annotations

import hashlib
import json

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedsilo.common.errors import PlanHashMismatch
from fedsilo.network.message_base import BlobRef
from fedsilo.network.messages import ApprovalRequest, MessageError, TrainRequest, parse_message
from fedsilo.node.transfer import fetch_plan_source

DATA = b"an update's bytes"
B3 = blake3.blake3(DATA).hexdigest()
SHA = hashlib.sha256(DATA).hexdigest()


def _request(plan: BlobRef, params: BlobRef) -> TrainRequest:
    return TrainRequest(sender="r", job_id="j", round=0, dataset_id="d", plan=plan, plan_name="P",
                        blobs={"params": params})  # fmt: skip


def test_a_ref_is_named_by_one_digest_and_keyed_by_it() -> None:
    b3, sha = BlobRef(blake3=B3, size=len(DATA)), BlobRef(sha256=SHA, size=len(DATA))
    assert (b3.algorithm, b3.digest, b3.key) == ("blake3", B3, "blake3-" + B3)
    assert (sha.algorithm, sha.digest, sha.key) == ("sha256", SHA, SHA)  # the store's name of a blob from before
    assert BlobRef.named("blake3", B3, len(DATA)) == b3 and b3 != BlobRef(blake3=B3, size=len(DATA) + 1)
    assert BlobRef.inline(DATA) == BlobRef(blake3=B3, size=len(DATA), data=DATA)
    assert BlobRef.inline(DATA, "sha256").lean() == sha


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"size": 3}, "exactly one of sha256, blake3; it has none"),
        ({"sha256": SHA, "blake3": B3, "size": 3}, "it has sha256, blake3"),
        ({"blake3": B3.upper(), "size": 3}, "pattern"),
        ({"blake3": B3[:-1], "size": 3}, "pattern"),
        ({"blake2b": B3, "size": 3}, "Extra inputs"),
        ({"blake3": None, "sha256": None, "size": 3}, "it has none"),
        ({"blake3": B3, "size": -1}, "greater than or equal"),
    ],
)
def test_a_ref_without_exactly_one_well_formed_digest_is_refused(fields: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        BlobRef.model_validate(fields)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_inline_data_must_hash_to_the_ref_s_own_digest(algorithm: str) -> None:
    good = BlobRef.inline(DATA, algorithm)  # type: ignore[arg-type]
    wire = _request(BlobRef(sha256="a" * 64, size=1), good).to_json()
    assert parse_message(wire).params.data == DATA
    other = {"blake3": B3, "sha256": SHA}["sha256" if algorithm == "blake3" else "blake3"]
    forged = json.loads(wire)
    forged["blobs"]["params"][algorithm] = other  # the other digest's hex under this digest's name
    with pytest.raises(MessageError, match=f"does not hash to the ref's {algorithm}"):
        parse_message(json.dumps(forged).encode())


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2000), flip=st.integers(min_value=0, max_value=255))
def test_a_changed_byte_under_a_blake3_ref_is_refused(data: bytes, flip: int) -> None:
    ref = BlobRef.inline(data)
    wire = bytearray(_request(BlobRef(sha256="a" * 64, size=1), ref).to_wire())
    if data:
        wire[len(wire) - len(data)] ^= flip or 1  # a byte of the attached blob
        with pytest.raises(MessageError, match="does not hash"):
            parse_message(bytes(wire))
    else:
        assert parse_message(bytes(wire)).params.data == b""


@pytest.mark.parametrize("kind", ["train", "approval"])
def test_a_plan_is_named_by_its_sha256_only(kind: str) -> None:
    """The node checks a plan's sha256 against what its data manager approved: a plan named by BLAKE3 is refused
    on receipt, before anything is looked up or downloaded."""
    plan = BlobRef(blake3=B3, size=len(DATA))
    with pytest.raises(ValidationError, match="a plan is named by its sha256"):
        if kind == "train":
            _request(plan, BlobRef(blake3=B3, size=1))
        else:
            ApprovalRequest(sender="r", plan=plan, plan_name="P")


def test_fetching_a_plan_by_another_digest_is_refused_even_past_the_message_check() -> None:
    class Store:
        def download_bytes(self, ref: BlobRef, max_bytes: int | None = None) -> bytes:
            return DATA  # what the store holds under that name, verified by the client against the ref

    with pytest.raises(PlanHashMismatch):
        fetch_plan_source(Store(), BlobRef(blake3=B3, size=len(DATA)))  # type: ignore[arg-type]
    assert fetch_plan_source(Store(), BlobRef(sha256=SHA, size=len(DATA))) == DATA.decode()  # type: ignore[arg-type]
