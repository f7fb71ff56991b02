"""The receive path of a signing party (`Messaging.of`), fed the bytes a broker would deliver: what is parsed,
what is refused, and what waits for the roster after a (re)connection."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

from fedsilo.common.signing import Roster, RosterEntry, generate_key, private_b64, public_b64, sign_json
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials, FileStoreSettings, MqttSettings
from fedsilo.network.messages import Message, MessageError, PingRequest, UntrustedMessage
from fedsilo.network.messaging import Messaging

AUTHORITY = generate_key()
KEYS = {name: generate_key() for name in ("n1", "r1", "r2")}


def roster(version: int, *names: str) -> bytes:
    roles = {"n1": "node", "r1": "researcher", "r2": "researcher"}
    parties = {n: RosterEntry(role=roles[n], key=public_b64(KEYS[n])) for n in names}
    return Roster(version=version, parties=parties).sign(AUTHORITY)


class Node:
    """n1's connection (never started), holding the roster of its credentials: n1 and r1 only."""

    def __init__(self) -> None:
        creds = Credentials(party="n1", role="node", mqtt=MqttSettings(username="n1", password="x"),
                            filestore=FileStoreSettings(url="http://127.0.0.1:9", token="x"),
                            signing_key=private_b64(KEYS["n1"]), authority_key=public_b64(AUTHORITY),
                            roster=roster(1, "n1", "r1").decode())  # fmt: skip
        self.got: list[Message] = []
        self.refused: list[MessageError] = []
        self.m = Messaging.of(creds, on_message=lambda msg, t: self.got.append(msg),
                              on_invalid=lambda exc, t: self.refused.append(exc))  # fmt: skip

    def deliver(self, topic: str, payload: bytes) -> None:
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = payload
        self.m._handle_message(None, None, msg)


def request(researcher: str) -> bytes:
    return sign_json(PingRequest(sender=researcher).to_json(), researcher, KEYS[researcher])


def test_a_verified_request_carries_its_signer() -> None:
    node = Node()
    node.deliver(topics.node("n1", "r1"), request("r1"))
    assert [m.signer for m in node.got] == ["r1"] and len(node.got[0].signature) == 88


def test_a_request_signed_by_another_researcher_than_the_publisher_is_refused() -> None:
    node = Node()
    node.deliver(topics.node("n1", "r2"), request("r1"))  # r2 publishes a copy of r1's signed request
    assert node.got == [] and isinstance(node.refused[0], UntrustedMessage) and node.refused[0].code == "FS102"


def test_after_connecting_an_unknown_signer_waits_for_the_roster() -> None:
    node = Node()
    node.m._hold_until = time.monotonic() + 60  # as right after a (re)connection
    node.deliver(topics.node("n1", "r2"), request("r2"))  # r2 joined after n1's credentials were made
    assert node.got == [] and node.refused == []
    node.deliver(topics.ROSTER, roster(2, "n1", "r1", "r2"))
    assert [m.sender for m in node.got] == ["r2"]


def test_without_a_roster_the_held_message_is_refused_once_the_wait_is_over() -> None:
    node = Node()
    node.m._hold_until = time.monotonic() + 60
    node.deliver(topics.node("n1", "r2"), request("r2"))
    node.m._hold_until = 0.0  # the wait is over: the watchdog releases what waited
    node.m._release_held()
    assert node.got == [] and node.refused[0].code == "FS105"


def test_a_forged_roster_on_the_roster_topic_changes_nothing() -> None:
    node = Node()
    rogue = generate_key()
    forged = Roster(version=9, parties={"r2": RosterEntry(role="researcher", key=public_b64(KEYS["r2"]))})
    node.deliver(topics.ROSTER, forged.sign(rogue))
    node.deliver(topics.node("n1", "r2"), request("r2"))
    assert node.got == [] and node.refused[0].code == "FS105"


# ------------------------------------------------------------------ a wire form with attached blobs
def _attached_reply(sender: str = "n1") -> tuple[bytes, bytes]:
    """A TrainReply with a 200 KB inline blob: the bytes `Messaging` publishes (JSON signed, blob after it)."""
    import os

    from fedsilo.network.message_base import BlobRef
    from fedsilo.network.messages import TrainReply

    data = os.urandom(200_000)
    reply = TrainReply.for_request("req-1", sender, job_id="j", round=0, dataset_id="d", sample_size=4,
                                   blobs={"params": BlobRef.inline(data)})  # fmt: skip
    sender_side = Messaging.__new__(Messaging)
    sender_side._signer = (sender, KEYS[sender])
    return sender_side._signed(reply.to_wire()), data


class Researcher(Node):
    """r1's connection (never started): it takes what nodes sign."""

    def __init__(self) -> None:
        creds = Credentials(party="r1", role="researcher", mqtt=MqttSettings(username="r1", password="x"),
                            filestore=FileStoreSettings(url="http://127.0.0.1:9", token="x"),
                            signing_key=private_b64(KEYS["r1"]), authority_key=public_b64(AUTHORITY),
                            roster=roster(1, "n1", "r1").decode())  # fmt: skip
        self.got, self.refused = [], []
        self.m = Messaging.of(creds, on_message=lambda msg, t: self.got.append(msg),
                              on_invalid=lambda exc, t: self.refused.append(exc))  # fmt: skip


def test_a_signed_reply_with_an_attached_blob_is_verified_and_carries_the_blob() -> None:
    wire, data = _attached_reply()
    assert wire.index(b'"sig":"n1:') < wire.index(b"\0")  # the signature closes the JSON, the blob follows
    r = Researcher()
    r.deliver(topics.researcher("r1", "n1"), wire)
    assert r.refused == [] and r.got[0].blobs["params"].data == data and r.got[0].signer == "n1"


def test_a_changed_json_or_a_changed_blob_under_a_valid_signature_is_refused() -> None:
    wire, _ = _attached_reply()
    r = Researcher()
    r.deliver(topics.researcher("r1", "n1"), wire.replace(b'"sample_size":4', b'"sample_size":5', 1))
    assert r.got == [] and isinstance(r.refused[0], UntrustedMessage)  # the JSON is signed
    tail = bytearray(wire)
    tail[-1] ^= 1
    r.deliver(topics.researcher("r1", "n1"), bytes(tail))
    assert r.got == [] and "does not hash" in r.refused[1].reason  # the blob is bound by its sha256
    r.deliver(topics.researcher("r1", "n1"), wire + b"more")
    assert r.got == [] and "no blob ref names" in r.refused[2].reason
