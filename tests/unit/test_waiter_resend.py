"""A request whose reply has reached the researcher is not re-sent while the reply waits to be taken.

At K=25 under load the researcher took a reply out of its queue 10 s or more after it arrived (it downloads the
replies ahead of it one by one), so `Waiter.get` re-sent those requests and every node published its kept reply
again. The connection here is the researcher's own, never started: replies come in through its signed receive
path as the broker would deliver them, and what it publishes (the broker's side) is recorded.
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest

from fedsilo.common.signing import Roster, RosterEntry, generate_key, private_b64, public_b64, sign_json
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials, FileStoreSettings, MqttSettings
from fedsilo.network.messages import Message, PingReply, PingRequest
from fedsilo.researcher import connection
from fedsilo.researcher.connection import Connection, Waiter

AUTHORITY = generate_key()
KEYS = {name: generate_key() for name in ("researcher", "n1", "n2")}
ROLES = {"researcher": "researcher", "n1": "node", "n2": "node"}


class RecordingConnection(Connection):
    """The researcher's connection with its broker side replaced by a record of what it publishes."""

    def __init__(self) -> None:
        roster = Roster(version=1, parties={n: RosterEntry(role=r, key=public_b64(KEYS[n])) for n, r in ROLES.items()})
        creds = Credentials(party="researcher", role="researcher", mqtt=MqttSettings(username="researcher",
                            password="x"), filestore=FileStoreSettings(url="http://127.0.0.1:9", token="t"),
                            signing_key=private_b64(KEYS["researcher"]), authority_key=public_b64(AUTHORITY),
                            roster=roster.sign(AUTHORITY).decode())  # fmt: skip
        super().__init__(creds)
        self.epoch = 1
        self.published: list[tuple[str, Message]] = []

    @property
    def connected(self) -> bool:
        return True

    def publish(self, topic: str, message: Message) -> None:
        self.published.append((topic, message))

    def receive(self, reply: PingReply) -> None:
        """`reply` signed by its node and delivered on the node's reply topic, as paho's thread hands it over."""
        msg = mqtt.MQTTMessage(topic=topics.researcher("researcher", reply.node_id).encode())
        msg.payload = sign_json(reply.to_json(), reply.node_id, KEYS[reply.node_id])
        self.messaging._handle_message(None, None, msg)


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> RecordingConnection:
    monkeypatch.setattr(connection, "RESEND_FIRST_S", 0.0)  # every unanswered request is due at once
    return RecordingConnection()


def test_reply_waiting_in_the_queue_is_not_re_requested(conn: RecordingConnection) -> None:
    req = PingRequest(sender="researcher")
    w = Waiter([req.request_id], None, False, conn)
    conn.register(w)
    w.track(topics.node("n1", "researcher"), req, "n1")
    conn.receive(PingReply.for_request(req, "n1", version="1"))
    got = w.get(time.monotonic() + 5)
    assert isinstance(got, PingReply) and got.signer == "n1"
    assert conn.published == []  # before: the request was re-sent although its answer was in the queue


def test_unanswered_request_is_still_re_sent(conn: RecordingConnection) -> None:
    req, other = PingRequest(sender="researcher"), PingRequest(sender="researcher")
    w = Waiter([req.request_id, other.request_id], None, False, conn)
    conn.register(w)
    w.track(topics.node("n1", "researcher"), req, "n1")
    w.track(topics.node("n2", "researcher"), other, "n2")
    conn.receive(PingReply.for_request(req, "n1", version="1"))
    w.get(time.monotonic() + 5)
    assert [(topic, m.request_id) for topic, m in conn.published] == [(topics.node("n2", "researcher"),
                                                                       other.request_id)]  # fmt: skip
