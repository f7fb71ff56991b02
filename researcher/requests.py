"""The researcher's side of the wire: one MQTT connection, node presence, request/reply routing.

Handlers run on paho's network thread and only enqueue; the notebook thread blocks on queues with
deadlines, so no wait ever sleeps a fixed time and every wait ends.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedsilo.common.config import Timeouts
from fedsilo.common.errors import RemoteError
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.messages import (
    ApprovalReply,
    ApprovalRequest,
    BlobRef,
    DatasetInfo,
    ErrorReply,
    ListReply,
    ListRequest,
    LogMessage,
    Message,
    PingReply,
    PingRequest,
    PlanStatusReply,
    PlanStatusRequest,
    Presence,
    Reply,
    ScalarMessage,
    SearchReply,
    SearchRequest,
)
from fedsilo.network.messaging import Messaging

log = logging.getLogger(__name__)


@dataclass
class NodeState:
    node_id: str
    name: str
    online: bool
    version: str = ""
    seen_at: float = 0.0


@dataclass
class Collected:
    """Replies of a request sent to several nodes: answers, error replies, and who stayed silent."""

    replies: dict[str, Reply]
    errors: dict[str, RemoteError]
    missing: list[str]


class Waiter:
    """A queue fed with the replies (and, optionally, presence and scalars) meant for one exchange."""

    def __init__(self, keys: Iterable[str], job_id: str | None, watch_presence: bool) -> None:
        self.keys = set(keys)
        self.job_id = job_id
        self.watch_presence = watch_presence
        self.queue: queue.Queue[Message] = queue.Queue()

    def get(self, deadline: float) -> Message | None:
        """The next message, or None once `deadline` (time.monotonic) has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                return self.queue.get_nowait()
            except queue.Empty:
                return None
        try:
            return self.queue.get(timeout=remaining)
        except queue.Empty:
            return None


class Requests:
    """A researcher's connection: `start()`, then search/ping/list/approval/status, or `waiter()` for rounds."""

    def __init__(
        self,
        credentials: Credentials,
        timeouts: Timeouts | None = None,
        on_log: Callable[[LogMessage], None] | None = None,
    ) -> None:
        self.party = credentials.party
        self.client_id = f"{credentials.party}-{secrets.token_hex(4)}"
        self.timeouts = timeouts or Timeouts()
        self._on_log = on_log
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeState] = {}
        self._presence_seen = threading.Event()
        self._by_key: dict[str, Waiter] = {}
        self._by_job: dict[str, list[Waiter]] = {}
        self._presence_waiters: list[Waiter] = []
        self._messaging = Messaging(
            self.client_id,
            credentials.mqtt,
            on_message=self._route,
            subscriptions=[topics.researcher(self.party), topics.PRESENCE_ALL],
            persistent=False,
        )
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect to the broker; raises `BrokerUnavailable` with the address when it cannot."""
        if not self._started:
            self._messaging.start(self.timeouts.connect)
            self._started = True

    def close(self) -> None:
        if self._started:
            self._messaging.stop()
            self._started = False

    @property
    def connected(self) -> bool:
        return self._messaging.connected

    # ------------------------------------------------------------------ presence
    def nodes(self) -> dict[str, NodeState]:
        """Every node whose presence was seen, online or not."""
        with self._lock:
            return {k: NodeState(**vars(v)) for k, v in self._nodes.items()}

    def online_nodes(self, wait: bool = True) -> list[str]:
        """Node ids currently online. `wait`: give retained presence one request timeout to arrive."""
        if wait:
            self._presence_seen.wait(self.timeouts.request)
        with self._lock:
            return sorted(n for n, s in self._nodes.items() if s.online)

    def node_name(self, node_id: str) -> str:
        with self._lock:
            state = self._nodes.get(node_id)
        return state.name if state is not None and state.name else node_id

    # ------------------------------------------------------------------ routing
    @contextmanager
    def waiter(
        self, keys: Iterable[str] = (), job_id: str | None = None, watch_presence: bool = False
    ) -> Iterator[Waiter]:
        """Register a queue for replies to `keys` (request ids); scalars for `job_id`; presence changes."""
        w = Waiter(keys, job_id, watch_presence)
        with self._lock:
            for key in w.keys:
                self._by_key[key] = w
            if job_id:
                self._by_job.setdefault(job_id, []).append(w)
            if watch_presence:
                self._presence_waiters.append(w)
        try:
            yield w
        finally:
            with self._lock:
                for key in w.keys:
                    if self._by_key.get(key) is w:
                        del self._by_key[key]
                if job_id and w in self._by_job.get(job_id, []):
                    self._by_job[job_id].remove(w)
                    if not self._by_job[job_id]:
                        del self._by_job[job_id]
                if w in self._presence_waiters:
                    self._presence_waiters.remove(w)

    def add_keys(self, w: Waiter, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                w.keys.add(key)
                self._by_key[key] = w

    def publish(self, topic: str, message: Message) -> None:
        self._messaging.publish(topic, message)

    def _route(self, message: Message, topic: str) -> None:
        if isinstance(message, Presence):
            self._on_presence(message)
            return
        if isinstance(message, LogMessage):
            if self._on_log is not None:
                self._on_log(message)
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
            w.queue.put(message)

    def _on_presence(self, msg: Presence) -> None:
        with self._lock:
            self._nodes[msg.node_id] = NodeState(
                msg.node_id, msg.node_name or msg.node_id, msg.online, msg.version, time.time()
            )
            waiters = list(self._presence_waiters)
        self._presence_seen.set()
        for w in waiters:
            w.queue.put(msg)

    # ------------------------------------------------------------------ request/reply
    def collect(
        self,
        request: Message,
        nodes: Iterable[str] | None = None,
        timeout: float | None = None,
        broadcast_filter: Iterable[str] | None = None,
    ) -> Collected:
        """Send `request` and wait until every expected node answered or `timeout` passed.

        `nodes`: send to these nodes' topics and expect exactly them. Otherwise broadcast and expect
        every node online (optionally only those in `broadcast_filter`), following presence while
        waiting: a node going offline is no longer waited for.
        """
        timeout = self.timeouts.request if timeout is None else timeout
        targeted = nodes is not None
        allowed = set(broadcast_filter) if broadcast_filter is not None else None
        replies: dict[str, Reply] = {}
        errors: dict[str, RemoteError] = {}
        with self.waiter([request.request_id], watch_presence=not targeted) as w:
            if targeted:
                expected = set(nodes)  # type: ignore[arg-type]
                for node_id in sorted(expected):
                    self.publish(topics.node(node_id), request)
            else:
                expected = {n for n in self.online_nodes() if allowed is None or n in allowed}
                self.publish(topics.BROADCAST, request)
            deadline = time.monotonic() + timeout
            while expected - replies.keys() - errors.keys():
                msg = w.get(deadline)
                if msg is None:
                    break
                if isinstance(msg, Presence):
                    if allowed is not None and msg.node_id not in allowed:
                        continue
                    if msg.online:
                        expected.add(msg.node_id)
                    elif msg.node_id not in replies:
                        expected.discard(msg.node_id)
                    continue
                if not isinstance(msg, Reply) or (allowed is not None and msg.node_id not in allowed):
                    continue
                if isinstance(msg, ErrorReply):
                    errors[msg.node_id] = remote_error(msg)
                else:
                    replies[msg.node_id] = msg
                if not targeted:
                    expected.add(msg.node_id)
        missing = sorted(expected - replies.keys() - errors.keys())
        return Collected(replies, errors, missing)

    def search(self, tags: list[str], nodes: Iterable[str] | None = None, timeout: float | None = None) -> Collected:
        """Which online nodes hold datasets with all `tags` (each reply lists them, maybe none)."""
        return self.collect(SearchRequest(sender=self.party, tags=list(tags)), broadcast_filter=nodes, timeout=timeout)

    def ping(self, nodes: Iterable[str] | None = None, timeout: float | None = None) -> dict[str, PingReply]:
        got = self.collect(PingRequest(sender=self.party), broadcast_filter=nodes, timeout=timeout)
        return {n: r for n, r in got.replies.items() if isinstance(r, PingReply)}

    def list_datasets(
        self, nodes: Iterable[str] | None = None, timeout: float | None = None
    ) -> dict[str, list[DatasetInfo]]:
        got = self.collect(ListRequest(sender=self.party), broadcast_filter=nodes, timeout=timeout)
        return {n: r.datasets for n, r in sorted(got.replies.items()) if isinstance(r, ListReply)}

    def submit_plan(
        self, nodes: Iterable[str], plan: BlobRef, plan_name: str, description: str = "", timeout: float | None = None
    ) -> Collected:
        req = ApprovalRequest(sender=self.party, plan=plan, plan_name=plan_name, description=description)
        return self.collect(req, nodes=nodes, timeout=timeout)

    def plan_status(self, nodes: Iterable[str], plan_sha256: str, timeout: float | None = None) -> Collected:
        return self.collect(PlanStatusRequest(sender=self.party, plan_sha256=plan_sha256), nodes=nodes, timeout=timeout)


def remote_error(reply: ErrorReply) -> RemoteError:
    """An ErrorReply as the exception a researcher reads (node name, code, stage, message)."""
    return RemoteError(reply.node_name or reply.node_id, str(reply.code), reply.message, reply.stage, reply.in_reply_to)


__all__ = [
    "ApprovalReply",
    "Collected",
    "NodeState",
    "PlanStatusReply",
    "Requests",
    "SearchReply",
    "Waiter",
    "remote_error",
]
