"""Who is speaking, on both brokers: client ids bound to usernames, identities proven by topics.

A hostile party here holds valid credentials of its own (node n2, researcher r2) and tries to pass
for another party: take over its connection, speak for it on a topic, or claim its name in a payload.
"""

from __future__ import annotations

import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fedsilo.network import topics
from fedsilo.network.messages import PingReply, PingRequest, Presence
from fedsilo.network.messaging import Messaging
from fedsilo.network.pki import paho_tls
from fedsilo.researcher.requests import Requests
from tests.support.brokers import BOTH
from tests.support.procs import NetworkHandle, start_network

WAIT = 20.0


@pytest.fixture(scope="module", params=BOTH)
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NetworkHandle:
    handle = start_network(tmp_path_factory.mktemp(f"identity-{request.param}"), broker=request.param)
    for name in ("n1", "n2"):
        handle.add_party(name, "node")
    handle.add_party("r2", "researcher")
    yield handle
    handle.stop()


class Node:
    """A node-side connection that counts its (re)connections and keeps what it receives."""

    def __init__(self, net: NetworkHandle, name: str, client_id: str | None = None) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.connects = 0
        self.connected_event = threading.Event()
        creds = net.credentials(name)
        self.m = Messaging(client_id or name, creds.mqtt, on_message=lambda msg, t: self.inbox.put((t, msg)),
                           subscriptions=[topics.node_inbox(name)], on_connected=self._up, persistent=True)  # fmt: skip
        self.m.start(timeout=WAIT)

    def _up(self) -> None:
        self.connects += 1
        self.connected_event.set()

    def get(self, timeout: float = WAIT):
        return self.inbox.get(timeout=timeout)


def raw_client(net: NetworkHandle, party: str, client_id: str, password: str | None = None) -> mqtt.Client:
    """A bare paho connection (no reconnects) with any client id and, optionally, a wrong password."""
    creds = net.credentials(party).mqtt
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=False)  # fmt: skip
    client.username_pw_set(creds.username, password or creds.password)
    paho_tls(client, creds)
    client.on_connect = lambda *_: done.set()
    client.connect(creds.host, creds.port)
    client.loop_start()
    done.wait(WAIT)
    return client


def ping_from(researcher: Messaging, node: str) -> str:
    msg = PingRequest(sender="researcher")
    researcher.publish(topics.node(node, "researcher"), msg).wait_for_publish(WAIT)
    return msg.request_id


@pytest.fixture
def researcher(net: NetworkHandle):
    m = Messaging("researcher", net.credentials("researcher").mqtt, on_message=lambda *_: None)
    m.start(timeout=WAIT)
    yield m
    m.stop()


def test_another_party_cannot_take_over_a_node_by_its_client_id(net: NetworkHandle, researcher: Messaging) -> None:
    n1 = Node(net, "n1")
    try:
        mallory = raw_client(net, "n2", client_id="n1")  # valid credentials of n2, n1's client id
        stranger = raw_client(net, "n2", client_id="n1", password="wrong")  # refused, must touch nothing
        try:
            time.sleep(1.0)  # a takeover would have closed n1's socket by now
            rid = ping_from(researcher, "n1")
            topic, msg = n1.get()
            assert msg.request_id == rid and topic == topics.node("n1", "researcher")
            assert n1.connects == 1 and n1.m.connected, "n1 was knocked off the broker"
        finally:
            for c in (mallory, stranger):
                c.disconnect()
                c.loop_stop()
    finally:
        n1.m.stop()


def test_a_node_that_reconnects_while_its_old_connection_lingers_receives(
    net: NetworkHandle, researcher: Messaging
) -> None:
    """The same party connecting again (a restarted daemon whose old TCP connection is still open) takes
    its session over and receives; the embedded broker once left such a node deaf for good."""
    old = raw_client(net, "n1", client_id="n1")
    old.subscribe(topics.node_inbox("n1"), qos=1)
    old.loop_stop()  # the old process is gone: nothing reads or answers on that socket any more
    n1 = Node(net, "n1")
    try:
        for _ in range(3):
            rid = ping_from(researcher, "n1")
            _, msg = n1.get()
            assert msg.request_id == rid
    finally:
        n1.m.stop()
        old.disconnect()


def test_a_node_taken_over_by_its_own_credentials_reconnects(net: NetworkHandle, researcher: Messaging) -> None:
    n1 = Node(net, "n1")
    try:
        intruder = raw_client(net, "n1", client_id="whatever")  # becomes "n1": takes the session over
        intruder.disconnect()
        intruder.loop_stop()
        deadline = time.monotonic() + WAIT
        while n1.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert n1.connects >= 2, "n1 did not notice the takeover and reconnect"
        rid = ping_from(researcher, "n1")
        while True:
            _, msg = n1.get()
            if msg.request_id == rid:
                break
    finally:
        n1.m.stop()


def test_the_researcher_believes_presence_and_replies_only_from_the_node_they_name(net: NetworkHandle) -> None:
    req = Requests(net.credentials("researcher"))
    req.start()
    n1 = Messaging.of(net.credentials("n1"), on_message=lambda *_: None)  # signed, as a node daemon's
    n2 = Messaging.of(net.credentials("n2"), on_message=lambda *_: None)
    n1.start(WAIT)
    n2.start(WAIT)
    try:
        n1.publish(topics.presence("n1"), Presence(sender="n1", node_id="n1", online=True), retain=True)
        deadline = time.monotonic() + WAIT
        while "n1" not in req.online_nodes(wait=False) and time.monotonic() < deadline:
            time.sleep(0.05)
        lie = Presence(sender="n1", node_id="n1", online=False)
        n2.publish(topics.researcher("researcher", "n2"), lie)  # on its reply topic: not a presence topic
        n2.publish(topics.presence("n2"), lie)  # its own presence topic, naming n1
        n2.publish(topics.presence("n1"), lie)  # n1's presence topic: the ACL refuses it
        n2.publish(topics.researcher("researcher", "n1"), lie)  # n1's reply topic: refused too
        with req.waiter(["r-42"]) as w:
            forged = PingReply(sender="n1", node_id="n1", in_reply_to="r-42", version="evil")
            n2.publish(topics.researcher("researcher", "n2"), forged)
            n2.publish(topics.researcher("researcher", "n1"), forged)
            barrier = PingReply(sender="n2", node_id="n2", in_reply_to="r-42", version="barrier")
            n2.publish(topics.researcher("researcher", "n2"), barrier)  # per-publisher order: the last to arrive
            got = w.get(time.monotonic() + WAIT)
            assert got is not None and got.node_id == "n2" and got.version == "barrier"
            n1.publish(topics.researcher("researcher", "n1"), PingReply(sender="n1", node_id="n1", in_reply_to="r-42",
                                                                        version="real"))  # fmt: skip
            got = w.get(time.monotonic() + WAIT)
            assert got is not None and got.node_id == "n1" and got.version == "real"
        assert req.nodes()["n1"].online, "a presence lie from n2 made n1 look offline"
    finally:
        n1.stop()
        n2.stop()
        req.close()


def test_two_experiments_in_one_process_share_the_researchers_connection(net: NetworkHandle) -> None:
    a, b = Requests(net.credentials("researcher")), Requests(net.credentials("researcher"))
    a.start()
    b.start()
    try:
        assert a._conn is b._conn
        a.close()
        assert b.connected
    finally:
        b.close()


def test_a_new_connection_sees_every_online_node_not_just_the_first_presence(net: NetworkHandle) -> None:
    """The retained presence arrives as a burst, behind what the broker queued for the researcher's
    session while it was away (here n1 going offline and back): `online_nodes()` waits for the burst to end.
    Answering at its first message gave one node of three, or none (n1's queued offline first)."""
    for name in ("n3", "n4"):
        if not net.credentials_path(name).is_file():
            net.add_party(name, "node")
    nodes = {}
    for name in ("n1", "n3", "n4"):
        m = Messaging.of(net.credentials(name), on_message=lambda *_: None)
        m.start(WAIT)
        m.publish(topics.presence(name), Presence(sender=name, node_id=name, online=True), retain=True)
        nodes[name] = m
    try:
        for attempt in range(8):
            req = Requests(net.credentials("researcher"))
            req.start()
            assert req.online_nodes() == ["n1", "n3", "n4"], f"attempt {attempt}"
            req.close()
            for online in (False, True):  # queued for the researcher's persistent session while it is away
                nodes["n1"].publish(topics.presence("n1"), Presence(sender="n1", node_id="n1", online=online),
                                    retain=True).wait_for_publish(WAIT)  # fmt: skip
    finally:
        for m in nodes.values():
            m.stop()
