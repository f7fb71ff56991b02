"""The researcher's side of the wire: one MQTT connection, node presence, request/reply routing.

Handlers run on paho's network thread and only enqueue; the notebook thread blocks on queues with
deadlines, so no wait ever sleeps a fixed time and every wait ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedsilo.common.config import Timeouts
from fedsilo.common.errors import RemoteError
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.message_base import inline_bytes
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
    SearchReply,
    SearchRequest,
)

from .connection import Connection, NodeState, Waiter

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """Replies of a request sent to several nodes: answers, error replies, and who stayed silent."""

    replies: dict[str, Reply]
    errors: dict[str, RemoteError]
    missing: list[str]


class Requests:
    """A researcher's handle on its party's shared connection: search/ping/list/approval/status, or
    `waiter()` + `send()` for rounds.

        req = Requests(credentials)
        req.start()
        print(req.ping())
        req.close()
    """

    def __init__(
        self,
        credentials: Credentials,
        timeouts: Timeouts | None = None,
        on_log: Callable[[LogMessage], None] | None = None,
    ) -> None:
        self.party = credentials.party
        self.client_id = credentials.party  # both brokers use the username as the client id
        self.timeouts = timeouts or Timeouts()
        self._credentials = credentials
        self._on_log = on_log
        self._conn: Connection | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect to the broker (or join this process's connection); raises `BrokerUnavailable`."""
        if self._conn is None:
            self._conn = Connection.acquire(self._credentials, self.timeouts.connect)
            if self._on_log is not None:
                self._conn.log_listeners.append(self._on_log)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._on_log in conn.log_listeners:
                conn.log_listeners.remove(self._on_log)  # type: ignore[arg-type]
            conn.release()

    @property
    def credentials(self) -> Credentials:
        """The party's credentials (the round's download threads make their file-store clients from them)."""
        return self._credentials

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.connected

    @property
    def _c(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("Requests.start() was not called")
        return self._conn

    # ------------------------------------------------------------------ presence
    def nodes(self) -> dict[str, NodeState]:
        """Every node whose presence was seen, online or not."""
        return self._c.nodes()

    def online_nodes(self, wait: bool = True) -> list[str]:
        """Node ids currently online. `wait`: let the retained presence burst arrive (at most a request timeout)."""
        if wait:
            self._c.wait_presence(self.timeouts.request)
        return sorted(n for n, s in self._c.nodes().items() if s.online)

    def node_name(self, node_id: str) -> str:
        state = self._c.nodes().get(node_id) if self._conn is not None else None
        return state.name if state is not None and state.name else node_id

    # ------------------------------------------------------------------ routing
    @contextmanager
    def waiter(
        self, keys: Iterable[str] = (), job_id: str | None = None, watch_presence: bool = False
    ) -> Iterator[Waiter]:
        """Register a queue for replies to `keys` (request ids); scalars for `job_id`; presence changes."""
        w = Waiter(keys, job_id, watch_presence, self._c)
        self._c.register(w)
        try:
            yield w
        finally:
            self._c.unregister(w)

    def add_keys(self, w: Waiter, keys: Iterable[str]) -> None:
        self._c.add_keys(w, keys)

    def send(self, w: Waiter, node: str | None, message: Message) -> None:
        """Publish a request to `node` (None: every node) and re-send it from `w.get` until answered."""
        if node is None and inline_bytes(message):  # every node reads the broadcast topic
            raise ValueError(f"a {message.kind} with inline blobs goes to one node's topic, never to all")
        topic = topics.node(node, self.party) if node is not None else topics.broadcast(self.party)
        w.track(topic, message, node)
        self._c.publish(topic, message)

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
                    self.send(w, node_id, request)
            else:
                expected = {n for n in self.online_nodes() if allowed is None or n in allowed}
                self.send(w, None, request)
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
