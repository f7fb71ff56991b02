"""Both brokers, started by `fedsilo network start`: auth, ACL, presence and wills, bursts, reload, restart."""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedsilo.network import topics
from fedsilo.network.broker import broker_accepts
from fedsilo.network.credentials import Credentials, MqttSettings
from fedsilo.network.messages import Message, PingRequest, Presence
from fedsilo.network.messaging import BrokerUnavailable, Messaging
from fedsilo.network.pki import paho_tls
from tests.support.procs import NetworkHandle, start_network, start_process, stop_process

WAIT = 20.0


@pytest.fixture(
    scope="module",
    params=[
        "embedded",
        pytest.param(
            "mosquitto",
            marks=[
                pytest.mark.mosquitto,
                pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed"),
            ],
        ),
    ],
)
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NetworkHandle:
    handle = start_network(tmp_path_factory.mktemp(f"broker-{request.param}"), broker=request.param)
    handle.add_party("n1", "node")
    handle.add_party("n2", "node")
    yield handle
    handle.stop()


class Inbox:
    """Collects (topic, message) pairs delivered to a Messaging client."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Message]] = queue.Queue()

    def __call__(self, message: Message, topic: str) -> None:
        self.items.put((topic, message))

    def get(self, timeout: float = WAIT) -> tuple[str, Message]:
        return self.items.get(timeout=timeout)

    def drain(self) -> list[tuple[str, Message]]:
        out = []
        while not self.items.empty():
            out.append(self.items.get_nowait())
        return out


def connect(creds: Credentials, subscriptions: list[str], persistent: bool = False, **kw) -> tuple[Messaging, Inbox]:
    inbox = Inbox()
    client = Messaging(
        f"{creds.party}-test-{threading.get_ident()}-{len(subscriptions)}" if not persistent else creds.party,
        creds.mqtt,
        on_message=inbox,
        subscriptions=subscriptions,
        persistent=persistent,
        **kw,
    )
    client.start(timeout=WAIT)
    return client, inbox


def suback_codes(settings: MqttSettings, topic: str) -> list[int]:
    """Subscribe with a bare paho client and return the SUBACK codes (0x80 = refused)."""
    done = threading.Event()
    codes: list[int] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"suback-{settings.username}",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(settings.username, settings.password)
    paho_tls(client, settings)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)

    def on_subscribe(_c, _u, _mid, reason_codes, _p) -> None:
        codes.extend(rc.value for rc in reason_codes)
        done.set()

    client.on_subscribe = on_subscribe
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        assert done.wait(WAIT)
    finally:
        client.disconnect()
        client.loop_stop()
    return codes


def ping(sender: str) -> PingRequest:
    return PingRequest(sender=sender)


# ---------------------------------------------------------------------------------------- auth
def test_auth_accepts_parties_and_refuses_others(net: NetworkHandle) -> None:
    researcher = net.credentials("researcher")
    assert broker_accepts(net.credentials("_monitor").mqtt)
    assert broker_accepts(net.credentials("n1").mqtt)
    wrong = researcher.mqtt.model_copy(update={"password": "not-the-password"})
    assert not broker_accepts(wrong)
    stranger = researcher.mqtt.model_copy(update={"username": "mallory"})
    assert not broker_accepts(stranger)
    with pytest.raises(BrokerUnavailable, match="refused 'researcher'"):
        Messaging("bad", wrong, on_message=lambda m, t: None).start(timeout=WAIT)


# ---------------------------------------------------------------------------------------- ACL
def test_subscribe_outside_the_acl_is_refused(net: NetworkHandle) -> None:
    if net.broker == "mosquitto":
        pytest.skip("mosquitto 2.0 grants such a SUBACK and filters on delivery (the next test checks that)")
    n1 = net.credentials("n1").mqtt
    assert suback_codes(n1, topics.node_inbox("n1")) == [1]
    assert suback_codes(n1, topics.node_inbox("n2"))[0] >= 0x80
    assert suback_codes(n1, topics.researcher_inbox("researcher"))[0] >= 0x80
    assert suback_codes(n1, "#")[0] >= 0x80
    assert suback_codes(net.credentials("researcher").mqtt, topics.PRESENCE_ALL) == [1]


def test_a_node_reads_neither_another_nodes_topic_nor_researcher_topics(net: NetworkHandle) -> None:
    researcher, r_inbox = connect(net.credentials("researcher"), [topics.researcher_inbox("researcher")])
    spy, spy_inbox = connect(
        net.credentials("n1"),
        [topics.node_inbox("n1"), topics.node_inbox("n2"), topics.researcher_inbox("researcher")],
    )
    try:
        # n1 may write a researcher topic but must not read it back: once the researcher has it, any
        # copy for n1 would have been queued before the barrier below.
        spy.publish(topics.researcher("researcher", "n1"), ping("n1"))
        assert r_inbox.get()[0] == topics.researcher("researcher", "n1")
        researcher.publish(topics.node("n2", "researcher"), ping("researcher"))
        barrier = researcher.publish(topics.node("n1", "researcher"), ping("researcher"))
        barrier.wait_for_publish(WAIT)
        topic, _ = spy_inbox.get()
        assert topic == topics.node("n1", "researcher")
        assert spy_inbox.drain() == []
    finally:
        spy.stop()
        researcher.stop()


def test_a_node_cannot_write_to_another_node(net: NetworkHandle) -> None:
    n2, n2_inbox = connect(net.credentials("n2"), [topics.node_inbox("n2")])
    n1, _ = connect(net.credentials("n1"), [])
    researcher, _ = connect(net.credentials("researcher"), [])
    try:
        n1.publish(topics.node("n2", "n1"), ping("n1")).wait_for_publish(WAIT)
        n1.publish(topics.node("n2", "researcher"), ping("n1")).wait_for_publish(WAIT)  # a researcher's topic
        researcher.publish(topics.node("n2", "researcher"), ping("researcher")).wait_for_publish(WAIT)
        # brokers acknowledge a refused publish without delivering it; mosquitto keeps per-subscriber
        # order, so the researcher's message arriving first is not a proof: check the sender.
        _, msg = n2_inbox.get()
        assert msg.sender == "researcher"
        assert n2_inbox.drain() == []
    finally:
        for c in (n1, n2, researcher):
            c.stop()


# ---------------------------------------------------------------------------------------- presence
PRESENCE_CLIENT = """
import sys, time
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.messages import Presence
from fedsilo.network.messaging import Messaging
creds = Credentials.load(sys.argv[1])
offline = Presence(sender=creds.party, node_id=creds.party, online=False)
m = Messaging(creds.party, creds.mqtt, on_message=lambda msg, t: None, will=(topics.presence(creds.party), offline))
m.start(timeout=20)
m.publish(topics.presence(creds.party), Presence(sender=creds.party, node_id=creds.party, online=True),
          retain=True).wait_for_publish(20)
print("online", flush=True)
time.sleep(600)
"""


def test_presence_is_retained_and_the_will_fires_on_kill(net: NetworkHandle, tmp_path: Path) -> None:
    log = tmp_path / "presence.log"
    proc = start_process(
        [sys.executable, "-c", PRESENCE_CLIENT, str(net.credentials_path("n1"))],
        log,
        ready=lambda: "online" in log.read_text(),
        timeout=WAIT,
    )
    try:
        # subscribing after the publish: only a retained message can arrive
        researcher, inbox = connect(net.credentials("researcher"), [topics.PRESENCE_ALL])
        try:
            topic, msg = inbox.get()
            assert topic == topics.presence("n1")
            assert isinstance(msg, Presence) and msg.online
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT)
            while msg.online:  # the retained copy may arrive more than once (QoS 1)
                topic, msg = inbox.get()
            assert topic == topics.presence("n1")
            assert isinstance(msg, Presence) and msg.sender == "n1"
        finally:
            researcher.stop()
    finally:
        stop_process(proc)
    # the will was retained too: a late subscriber learns the node is offline
    late, late_inbox = connect(net.credentials("researcher"), [topics.PRESENCE_ALL])
    try:
        _, msg = late_inbox.get()
        assert isinstance(msg, Presence) and not msg.online
    finally:
        late.stop()


# ---------------------------------------------------------------------------------------- load
def test_qos1_burst_is_delivered_completely(net: NetworkHandle) -> None:
    count = 2000
    node, _ = connect(net.credentials("n2"), [topics.node_inbox("n2")])
    seen: set[str] = set()
    done = threading.Event()

    def collect(message: Message, topic: str) -> None:
        seen.add(message.request_id)  # QoS 1 may deliver twice: count distinct requests
        if len(seen) == count:
            done.set()

    node._on_message = collect
    researcher, _ = connect(net.credentials("researcher"), [])
    try:
        infos = [researcher.publish(topics.node("n2", "researcher"), ping("researcher")) for _ in range(count)]
        for info in infos:
            info.wait_for_publish(WAIT)
        assert done.wait(60), f"{len(seen)} of {count} delivered"
    finally:
        researcher.stop()
        node.stop()


# ---------------------------------------------------------------------------------------- reload
def test_party_added_while_running_can_connect(net: NetworkHandle) -> None:
    name = f"late-{net.broker}"
    creds = net.add_party(name, "node")
    assert broker_accepts(creds.mqtt)
    node, inbox = connect(creds, [topics.node_inbox(name)])
    researcher, _ = connect(net.credentials("researcher"), [])
    try:
        researcher.publish(topics.node(name, "researcher"), ping("researcher"))
        topic, _ = inbox.get()
        assert topic == topics.node(name, "researcher")
    finally:
        node.stop()
        researcher.stop()
    with pytest.raises(Exception, match="already exists"):
        net.add_party(name, "node")


def test_cli_party_add_reloads_the_running_broker(net: NetworkHandle) -> None:
    name = f"cli-{net.broker}"
    out = subprocess.run(
        [sys.executable, "-c", "from fedsilo.common.cli import main; main()", "network", "party", "add", name,
         "--role", "node", "--dir", str(net.netdir)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert str(net.credentials_path(name)) in out.stdout
    assert broker_accepts(net.credentials(name).mqtt)


# ---------------------------------------------------------------------------------------- restart (last)
def test_messaging_reconnects_and_resubscribes_after_a_broker_restart(net: NetworkHandle) -> None:
    connected = threading.Semaphore(0)
    node, inbox = connect(net.credentials("n1"), [topics.node_inbox("n1")], persistent=True,
                          on_connected=connected.release)
    assert connected.acquire(timeout=WAIT)
    try:
        net.restart()
        assert connected.acquire(timeout=60), "no reconnection after the broker restarted"
        researcher, _ = connect(net.credentials("researcher"), [])
        try:
            researcher.publish(topics.node("n1", "researcher"), ping("researcher"))
            topic, msg = inbox.get()
            assert topic == topics.node("n1", "researcher") and msg.sender == "researcher"
        finally:
            researcher.stop()
    finally:
        node.stop()


# ---------------------------------------------------------------------------------------- watchdog
class _Fatal(BaseException):
    """Not an Exception: passes every `except Exception` and ends paho's network thread."""


def _fatal_node(net: NetworkHandle, inbox: Inbox, times: int) -> Messaging:
    """n1, whose handler dies (BaseException) on the first `times` deliveries of the request "fatal"."""
    left = {"n": times}

    def handler(message: Message, topic: str) -> None:
        if message.request_id == "fatal" and left["n"] > 0:
            left["n"] -= 1
            raise _Fatal()
        inbox(message, topic)

    node = Messaging("n1", net.credentials("n1").mqtt, on_message=handler,
                     subscriptions=[topics.node_inbox("n1")])  # fmt: skip
    node.start(timeout=WAIT)
    return node


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_restarts_a_dead_receive_thread(net: NetworkHandle) -> None:
    inbox = Inbox()
    node = _fatal_node(net, inbox, times=1)
    researcher, _ = connect(net.credentials("researcher"), [])
    try:
        researcher.publish(topics.node("n1", "researcher"), PingRequest(sender="researcher", request_id="fatal"))
        _wait(lambda: node.restarts == 1, "the dead network thread was not restarted")
        researcher.publish(topics.node("n1", "researcher"), ping("researcher"))
        got = {inbox.get()[1].request_id for _ in range(2 if net.broker == "mosquitto" else 1)}
        assert len(got) >= 1 and node.connected and not node.failed
    finally:
        researcher.stop()
        node.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_message_that_always_kills_the_thread_is_given_up_on(net: NetworkHandle) -> None:
    if net.broker != "mosquitto":
        pytest.skip("only a broker that re-delivers the unacknowledged message after a reconnect can loop")
    inbox = Inbox()
    node = _fatal_node(net, inbox, times=100)
    researcher, _ = connect(net.credentials("researcher"), [])
    try:
        researcher.publish(topics.node("n1", "researcher"), PingRequest(sender="researcher", request_id="fatal"))
        _wait(lambda: node.failed, "a thread dying on every re-delivery was restarted for ever")
        assert node.restarts == Messaging.MAX_RESTARTS and not node.connected
    finally:
        researcher.stop()
        node.stop()


# ---------------------------------------------------------------------------------------- payload size
def _bare(settings: MqttSettings, received: list[bytes] | None = None, subscribe: str = "") -> mqtt.Client:
    """A connected paho client (no fedsilo framing): what a hostile party with valid credentials speaks."""
    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-{settings.username}",
                         protocol=mqtt.MQTTv311)  # fmt: skip
    client.username_pw_set(settings.username, settings.password)
    paho_tls(client, settings)
    client.on_connect = lambda c, *_: c.subscribe(subscribe, qos=1) if subscribe else ready.set()
    client.on_subscribe = lambda *_: ready.set()
    if received is not None:
        client.on_message = lambda _c, _u, msg: received.append(msg.payload)
    client.connect(settings.host, settings.port)
    client.loop_start()
    assert ready.wait(WAIT)
    return client


def test_a_payload_over_the_publish_limit_is_not_delivered_and_closes_its_connection(net: NetworkHandle) -> None:
    """A node with valid credentials publishes 4 MB on its own reply topic: the broker closes its connection and
    the researcher receives nothing of it; a payload at the limit still crosses."""
    from fedsilo.network.messages import MAX_PUBLISH_BYTES

    received: list[bytes] = []
    researcher = _bare(net.credentials("researcher").mqtt, received, topics.researcher_inbox("researcher"))
    closed = threading.Event()
    node = _bare(net.credentials("n1").mqtt)
    node.on_disconnect = lambda *_: closed.set()
    try:
        node.publish(topics.researcher("researcher", "n1"), b"x" * (4 << 20), qos=1)
        assert closed.wait(WAIT)  # the broker hung up on it
        node.loop_stop()
        node.disconnect()
        node = _bare(net.credentials("n1").mqtt)
        node.publish(topics.researcher("researcher", "n1"), b"y" * MAX_PUBLISH_BYTES, qos=1).wait_for_publish(WAIT)
        deadline = time.monotonic() + WAIT
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything the broker would still deliver of the first payload arrives meanwhile
        assert [len(p) for p in received] == [MAX_PUBLISH_BYTES]
    finally:
        for client in (node, researcher):
            client.loop_stop()
            client.disconnect()
