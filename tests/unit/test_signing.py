"""Ed25519 envelopes, the authority's roster and what a party trusts (`common/signing.py`), and the node's
memory of accepted request ids (`node/replay.py`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.common.errors import ErrorCode
from fedsilo.common.signing import (
    Roster,
    RosterEntry,
    SignatureError,
    Trust,
    generate_key,
    private_b64,
    private_from_b64,
    public_b64,
    public_from_b64,
    sign_json,
    split_signed,
)
from fedsilo.network.messages import PingRequest
from fedsilo.node.replay import SeenRequests

AUTHORITY = generate_key()
KEYS = {name: generate_key() for name in ("r1", "n1", "stranger")}
ROSTER = Roster(version=1, parties={"r1": RosterEntry(role="researcher", key=public_b64(KEYS["r1"])),
                                    "n1": RosterEntry(role="node", key=public_b64(KEYS["n1"]))})  # fmt: skip


def node_trust(**kw) -> Trust:
    return Trust(AUTHORITY.public_key(), ROSTER.sign(AUTHORITY), accept={"researcher"}, **kw)


def signed_ping(signer: str = "r1", sender: str = "r1") -> bytes:
    return sign_json(PingRequest(sender=sender).to_json(), signer, KEYS[signer])


def test_keys_round_trip_through_base64() -> None:
    key = generate_key()
    assert private_b64(private_from_b64(private_b64(key))) == private_b64(key)
    assert public_b64(public_from_b64(public_b64(key))) == public_b64(key)
    with pytest.raises(ValueError, match="32 bytes"):
        public_from_b64("c2hvcnQ=")


def test_a_signed_message_opens_to_the_exact_bytes_signed() -> None:
    body = PingRequest(sender="r1").to_json()
    opened = node_trust().open(sign_json(body, "r1", KEYS["r1"]))
    assert opened.body == body and opened.signer == "r1" and opened.role == "researcher"


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (PingRequest(sender="r1").to_json(), ErrorCode.SIGNATURE_INVALID),  # unsigned
        (signed_ping("stranger", "stranger"), ErrorCode.UNKNOWN_SIGNER),  # a valid signature, unknown key
        (signed_ping("n1", "r1"), ErrorCode.SIGNER_ROLE),  # a node's key on a researcher's request
        (sign_json(PingRequest(sender="r1").to_json(), "r1", KEYS["n1"]), ErrorCode.SIGNATURE_INVALID),
    ],
    ids=["unsigned", "unknown-key", "node-key", "wrong-key"],
)
def test_forgeries_are_refused_with_their_code(wire: bytes, code: ErrorCode) -> None:
    with pytest.raises(SignatureError) as info:
        node_trust().open(wire)
    assert info.value.code == code


WIRE = signed_ping()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_mutation_of_a_signed_message_is_refused(data: st.DataObject) -> None:
    wire = bytearray(WIRE)
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
    at = data.draw(st.integers(0, len(wire) - 1))
    if kind == "flip":
        wire[at] ^= data.draw(st.integers(1, 255))
    elif kind == "insert":
        wire[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del wire[at : at + data.draw(st.integers(1, 8))]
    elif kind == "truncate":
        del wire[at:]
    else:
        wire += data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(SignatureError):
        node_trust().open(bytes(wire))


def test_the_signature_is_found_in_bounded_work_whatever_precedes_it() -> None:
    """A 1 MiB payload that repeats the signature member: only the end counts."""
    member = signed_ping()[-100:-1]
    junk = b"{" + (b'"a":1,' + member) * 10000 + b'"b":2}'
    with pytest.raises(SignatureError, match="unsigned"):
        split_signed(junk)


def test_a_roster_not_signed_by_the_authority_is_ignored() -> None:
    trust = node_trust()
    rogue = generate_key()
    forged = Roster(version=9, parties={"stranger": RosterEntry(role="researcher", key=public_b64(KEYS["stranger"]))})
    with pytest.raises(SignatureError, match="authority"):
        trust.offer_roster(forged.sign(rogue))
    assert trust.version == 1 and not trust.knows("stranger")


def test_a_newer_roster_adds_parties_and_an_older_one_changes_nothing() -> None:
    trust = node_trust()
    stranger = RosterEntry(role="researcher", key=public_b64(KEYS["stranger"]))
    newer = Roster(version=2, parties={**ROSTER.parties, "stranger": stranger})
    assert trust.offer_roster(newer.sign(AUTHORITY))
    assert trust.open(signed_ping("stranger", "stranger")).signer == "stranger"
    assert not trust.offer_roster(ROSTER.sign(AUTHORITY)), "a replayed older roster was adopted"
    assert trust.knows("stranger")


def test_the_newest_roster_is_kept_across_restarts(tmp_path: Path) -> None:
    store = tmp_path / "roster.signed"
    newer = Roster(version=5, parties={"r1": ROSTER.parties["r1"]})
    node_trust(store=store).offer_roster(newer.sign(AUTHORITY))
    assert node_trust(store=store).version == 5


def test_a_request_id_is_admitted_once_per_timestamp_and_remembered_after_a_restart(tmp_path: Path) -> None:
    path, now = tmp_path / "requests.sqlite3", time.time()
    seen = SeenRequests(path, window_s=360)
    assert not seen.replayed("r1", "a", now)
    seen.record("r1", "a", now)
    assert seen.replayed("r1", "a", now) and seen.replayed("r1", "a", now - 1)
    assert not seen.replayed("r1", "a", now + 1), "a re-sent copy (fresh timestamp) must be admitted"
    assert not seen.replayed("r2", "a", now), "ids are per researcher"
    seen.close()
    again = SeenRequests(path, window_s=360)
    assert again.replayed("r1", "a", now)


def test_ids_older_than_the_window_are_forgotten(tmp_path: Path) -> None:
    seen = SeenRequests(tmp_path / "requests.sqlite3", window_s=10)
    seen.record("r1", "old", time.time() - 1000)
    seen.record("r1", "new", time.time())
    seen.prune()
    assert len(seen) == 1
