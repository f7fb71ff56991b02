"""The researcher's MQTT connection: one per party and broker in a process, shared by every `Requests`.

Both brokers bind a client id to its username, so a party has one connection at a time: two
`Experiment`s in one notebook share this one (each keeps its own waiters), where two connections would
take each other over. Messages are routed to waiters by request id (replies) and job id (scalars).

Who said what: a node publishes only on `researcher/<me>/<its name>` and `presence/<its name>` (the ACL
enforces it), so a reply or presence whose `node_id` differs from its topic is a lie, logged and dropped.
Before that, `Messaging` drops (and logs) whatever is not signed by the node of its topic, that node being
a node in the consortium's roster: the broker cannot speak for a node either.

Requests are re-sent until answered: a broker restart loses what it had not delivered, and nodes
answer a re-sent request id with its state (ack while running, the kept reply once done).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.messages import LogMessage, Message, Presence, Reply, ScalarMessage, TaskAck
from fedsilo.network.messaging import Messaging

log = logging.getLogger(__name__)

RESEND_FIRST_S = 1.0
"""An unacknowledged request is re-sent after 1 s, then 2, 4, 8 s: a node acks within milliseconds."""
RESEND_MAX_S = 8.0
RESEND_ACKED_S = 10.0
"""An acknowledged request is re-sent when the researcher reconnected or the node came back online,
and every 10 s besides (a node answers a copy with its state, at the cost of one small message)."""
SLICE_S = 0.25


@dataclass
class NodeState:
    node_id: str
    name: str
    online: bool
    version: str = ""
    seen_at: float = 0.0


@dataclass
class _Pending:
    topic: str
    message: Message
    node: str | None
    epoch: int
    acked: bool = False
    tries: int = 1
    due: float = field(default_factory=lambda: time.monotonic() + RESEND_FIRST_S)


class Waiter:
    """A queue fed with the replies (and, optionally, presence and scalars) meant for one exchange.

    Requests sent through `Requests.send(waiter, ...)` are re-sent by `get` until answered."""

    def __init__(
        self, keys: Iterable[str], job_id: str | None, watch_presence: bool, conn: Connection | None = None
    ) -> None:
        self.keys = set(keys)
        self.job_id = job_id
        self.watch_presence = watch_presence
        self.queue: queue.Queue[Message] = queue.Queue()
        self._conn = conn
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def track(self, topic: str, message: Message, node: str | None) -> None:
        """Re-send `message` until answered; a broadcast (`node` None) only after a reconnection and every
        `RESEND_ACKED_S`: many nodes answer it, and none acknowledges it."""
        if self._conn is not None:
            first = RESEND_FIRST_S if node is not None else RESEND_ACKED_S
            with self._lock:
                self._pending[message.request_id] = _Pending(
                    topic, message, node, self._conn.epoch, acked=node is None, due=time.monotonic() + first
                )

    def get(self, deadline: float) -> Message | None:
        """The next message, or None once `deadline` (time.monotonic) has passed."""
        while True:
            self._resend_due()
            remaining = deadline - time.monotonic()
            try:
                msg = self.queue.get(timeout=min(max(remaining, 0.0), SLICE_S)) if remaining > 0 else None
                if msg is None:
                    msg = self.queue.get_nowait()
            except queue.Empty:
                if remaining <= 0:
                    return None
                continue
            return msg

    def deliver(self, msg: Message) -> None:
        """Queue `msg` (paho's thread); a reply counts as an answer now, not when `get` takes it out: at K=25
        under load the researcher took a reply out 10 s or more after it came (it downloads the replies ahead of
        it one by one), so every such request was re-sent and each node published its kept reply again (35
        re-sent requests over 6 rounds, 2026-11-30), work that grew with K times the round's length."""
        self._note(msg)
        self.queue.put(msg)

    def node_back(self, node: str) -> None:
        """`node` came (back) online: what it has not answered may have been lost; re-send it now."""
        with self._lock:
            for p in self._pending.values():
                if p.node == node:
                    p.due = 0.0

    def _note(self, msg: Message) -> None:
        if not isinstance(msg, Reply):
            return
        with self._lock:
            p = self._pending.get(msg.in_reply_to)
            if p is None:
                return
            if isinstance(msg, TaskAck):
                p.acked, p.due = True, time.monotonic() + RESEND_ACKED_S
            elif p.node is not None:  # a broadcast keeps collecting replies from many nodes
                del self._pending[msg.in_reply_to]

    def _resend_due(self) -> None:
        conn = self._conn
        if conn is None or not self._pending:
            return
        now, epoch = time.monotonic(), conn.epoch
        with self._lock:
            due = [p for p in self._pending.values() if p.due <= now or (p.epoch != epoch and conn.connected)]
            for p in due:
                p.tries += 1
                p.epoch = epoch
                delay = RESEND_ACKED_S if p.acked else min(RESEND_FIRST_S * 2 ** (p.tries - 1), RESEND_MAX_S)
                p.due = now + delay
        for p in due:
            log.info("re-sending %s %s to %s (copy %d)", p.message.kind, p.message.request_id, p.node or "all",
                     p.tries)  # fmt: skip
            conn.publish(p.topic, p.message.model_copy(update={"timestamp": time.time()}))


class Connection:
    """The shared connection of one researcher party (see the module docstring); `acquire`/`release`."""

    _shared: dict[tuple[str, str, int], Connection] = {}
    _shared_lock = threading.Lock()

    def __init__(self, credentials: Credentials) -> None:
        self.party = credentials.party
        self.epoch = 0  # +1 on every (re)connection: waiters re-send what may have been lost meanwhile
        self.refs = 0
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeState] = {}
        self.presence_seen = threading.Event()
        self._presence_at = 0.0
        self._by_key: dict[str, Waiter] = {}
        self._by_job: dict[str, list[Waiter]] = {}
        self._waiters: list[Waiter] = []
        self.log_listeners: list[Callable[[LogMessage], None]] = []
        self.messaging = Messaging.of(  # signed requests out; only replies and presence a node signed in
            credentials,
            on_message=self._route,
            subscriptions=[topics.researcher_inbox(self.party), topics.PRESENCE_ALL],
            on_connected=self._on_connected,
            persistent=True,  # replies queued by the broker while we reconnect are delivered after
        )

    @classmethod
    def acquire(cls, credentials: Credentials, connect_timeout: float) -> Connection:
        key = (credentials.party, credentials.mqtt.host, credentials.mqtt.port)
        with cls._shared_lock:
            conn = cls._shared.get(key)
            if conn is None:
                conn = cls(credentials)
                conn.messaging.start(connect_timeout)
                cls._shared[key] = conn
            conn.refs += 1
            return conn

    def release(self) -> None:
        with self._shared_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            for key, conn in list(self._shared.items()):
                if conn is self:
                    del self._shared[key]
        self.messaging.stop()

    @property
    def connected(self) -> bool:
        return self.messaging.connected

    def publish(self, topic: str, message: Message) -> None:
        self.messaging.publish(topic, message)

    # ------------------------------------------------------------------ waiters
    def register(self, w: Waiter) -> None:
        with self._lock:
            for key in w.keys:
                self._by_key[key] = w
            if w.job_id:
                self._by_job.setdefault(w.job_id, []).append(w)
            self._waiters.append(w)

    def add_keys(self, w: Waiter, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                w.keys.add(key)
                self._by_key[key] = w

    def unregister(self, w: Waiter) -> None:
        with self._lock:
            for key in w.keys:
                if self._by_key.get(key) is w:
                    del self._by_key[key]
            if w.job_id and w in self._by_job.get(w.job_id, []):
                self._by_job[w.job_id].remove(w)
                if not self._by_job[w.job_id]:
                    del self._by_job[w.job_id]
            if w in self._waiters:
                self._waiters.remove(w)

    # ------------------------------------------------------------------ presence
    PRESENCE_SETTLE_S = 0.25
    """Retained presence arrives as a burst after subscribing, behind whatever the broker queued for this
    session while it was away (a node's offline then online, say): the view is complete once the burst is
    over, not at its first message. Seen: the first message alone gave one node of three, or none."""

    def wait_presence(self, timeout: float) -> None:
        """Wait until some presence arrived and none for `PRESENCE_SETTLE_S` (at most `timeout`)."""
        deadline = time.monotonic() + timeout
        if not self.presence_seen.wait(timeout):
            return
        while (quiet := time.monotonic() - self._presence_at) < self.PRESENCE_SETTLE_S:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(self.PRESENCE_SETTLE_S - quiet, remaining))

    def nodes(self) -> dict[str, NodeState]:
        with self._lock:
            return {k: NodeState(**vars(v)) for k, v in self._nodes.items()}

    # ------------------------------------------------------------------ routing (paho's thread)
    def _on_connected(self) -> None:
        log.debug("connected to the broker (connection %d)", self.epoch + 1)
        self.epoch += 1
        if self.epoch > 1:
            log.info("reconnected to the broker; unanswered requests will be re-sent")

    def _route(self, message: Message, topic: str) -> None:
        publisher = topics.publisher(topic)
        if isinstance(message, Presence):
            if topic != topics.presence(message.node_id):
                log.warning("presence for %r published on %s by %r: ignored", message.node_id, topic, publisher)
                return
            self._on_presence(message)
            return
        claimed = getattr(message, "node_id", None)
        if claimed != publisher or topic != topics.researcher(self.party, publisher):
            log.warning("%s claiming to come from %r was published by %r on %s: ignored",
                        message.kind, claimed, publisher, topic)  # fmt: skip
            return
        if isinstance(message, LogMessage):
            for listener in list(self.log_listeners):
                listener(message)
            return
        with self._lock:
            if isinstance(message, ScalarMessage):
                targets = list(self._by_job.get(message.job_id, []))
            elif isinstance(message, Reply):
                w = self._by_key.get(message.in_reply_to)
                targets = [w] if w is not None else []
            else:
                targets = []
        if not targets:
            log.debug("no one waits for %s %s; ignored", message.kind, getattr(message, "in_reply_to", ""))
        for w in targets:
            w.deliver(message)

    def _on_presence(self, msg: Presence) -> None:
        log.debug("presence of %s: %s", msg.node_id, "online" if msg.online else "offline")
        self._presence_at = time.monotonic()
        with self._lock:
            before = self._nodes.get(msg.node_id)
            self._nodes[msg.node_id] = NodeState(
                msg.node_id, msg.node_name or msg.node_id, msg.online, msg.version, time.time()
            )
            waiters = list(self._waiters)
        self.presence_seen.set()
        came_back = msg.online and (before is None or not before.online or before.seen_at < time.time() - 1)
        for w in waiters:
            if came_back:
                w.node_back(msg.node_id)
            if w.watch_presence:
                w.queue.put(msg)
