"""The node daemon: answers requests, queues training tasks, runs them in the warm worker.

Threads: paho's network thread only hands messages to a one-thread dispatcher (quick answers:
search, ping, list, plan status, approval requests; train requests are validated, queued and acked);
a task runner feeds the durable queue to the worker process and publishes its events and replies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from fedsilo.common import PROTOCOL_VERSION, __version__
from fedsilo.common.errors import ConfigError, ErrorCode, FedsiloError
from fedsilo.common.malloc import keep_freed_memory
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.messages import (
    ApprovalReply,
    ApprovalRequest,
    ErrorReply,
    ListReply,
    ListRequest,
    Message,
    MessageError,
    PingReply,
    PingRequest,
    PlanStatusReply,
    PlanStatusRequest,
    Presence,
    Reply,
    SearchReply,
    SearchRequest,
    TaskAck,
    TaskRequest,
    UntrustedMessage,
)
from fedsilo.network.messaging import Messaging

from .access import DatasetAccess, node_permits
from .config import NodeConfig
from .datasets import DatasetStore, UnknownDataset
from .loading_plans import attach as attach_loading_plan
from .plans import PlanStore
from .replay import SeenRequests
from .secagg import SecaggSessions
from .secagg import refusal as secagg_refusal
from .secagg_auth import KeyAuthority
from .tasks import TaskQueue
from .worker import Worker, setup_file_logging

log = logging.getLogger("fedsilo.node.daemon")

R = TypeVar("R", bound=Reply)

class NodeDaemon:
    def __init__(self, config: NodeConfig) -> None:
        self.cfg = config
        self.paths = config.paths
        self.node_id = config.node.node_id
        self.creds = Credentials.load(self.paths.network)
        self.datasets = DatasetStore(config.dir, data_roots=config.node.data_roots)
        self.plans = PlanStore(config.dir)
        self.queue: TaskQueue | None = None
        self.worker = Worker(config.dir, config.timeouts.worker_start)
        self.stop_event = threading.Event()
        self._stopping = False
        self._dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsilo-dispatch")
        self._runner: threading.Thread | None = None
        self._filestore: Any = None
        self._status_lock = threading.Lock()
        self._status_due = False
        self._status_worker_pid: int | None = None
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._current: dict[str, Any] | None = None
        self._audit: Any = None
        self.secagg = SecaggSessions(self.node_id, KeyAuthority.of(self.creds, self.paths.db / "roster.signed"))
        self.access = DatasetAccess(config.dir)
        self.exit_code = 0
        self._seen: SeenRequests | None = None
        self.messaging = Messaging.of(  # signs what it publishes, verifies what arrives (`common/signing.py`)
            self.creds,
            roster_store=self.paths.db / "roster.signed",
            on_message=self._on_message,
            subscriptions=[topics.BROADCAST_ALL, topics.node_inbox(self.node_id)],
            on_invalid=self._on_invalid,
            will=(topics.presence(self.node_id), self._presence(False)),
            on_connected=self._on_connected,
            persistent=True,
        )

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        """Run until SIGTERM/SIGINT or `stop_event`; holds NODEDIR/node.lock meanwhile."""
        lock = FileLock(str(self.paths.lock))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"another node daemon is running on {self.paths.root} (node.lock is held)") from None
        try:
            self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> None:
        setup_file_logging(self.paths.log_file)
        if not self.cfg.node.require_approval:
            log.warning("plan approval is OFF: this node runs any plan a researcher sends (not for real data)")
        self.queue = TaskQueue(self.paths.queue)
        node = self.cfg.node
        self._seen = SeenRequests(self.paths.db / "requests.sqlite3", node.request_max_age_s + node.clock_skew_s)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        self._write_status()
        self.messaging.start(timeout=self.cfg.timeouts.connect)
        log.info("node '%s' started (pid %s), %d queued task(s)", self.node_id, os.getpid(), self.queue.size)
        self._runner = threading.Thread(target=self._run_tasks, name="fedsilo-tasks", daemon=True)
        self._runner.start()
        try:
            self._watch()
        finally:
            self._shutdown()

    STATUS_EVERY_S = 10.0
    STATUS_GAP_S = 0.25
    """status.json is rewritten at most this often: a round's start and end and each queued request only mark it
    due (`status_changed`). Measured (2026-11-30, py-spy of a K=1 daemon, peerbench small, ~60 ms rounds): three
    rewrites a round were 12 % of the daemon's busy time (JSON, a queue count, a file replaced)."""

    def status_changed(self) -> None:
        """What status.json shows changed: the watch loop writes it within `STATUS_GAP_S`; at once when the worker
        was (re)started since the last write (rare), so that its pid is current for whoever reads it next (an admin
        inspecting the sandboxed process, `tests/integration/test_worker_secrets.py`)."""
        if self.worker.pid != self._status_worker_pid:
            self._write_status()
        else:
            self._status_due = True

    def _watch(self) -> None:
        """Until stopped: keep status.json true (what changed within STATUS_GAP_S, connection state as it
        changes, a heartbeat otherwise)."""
        shown, written = self.messaging.connected, time.monotonic()
        while not self.stop_event.wait(self.STATUS_GAP_S):
            if self.messaging.failed:  # the receive loop cannot be kept alive: let a supervisor restart us
                log.critical("the broker connection cannot be kept alive; stopping with exit code 1")
                self.exit_code = 1
                return
            now = self.messaging.connected
            if self._status_due or now != shown or time.monotonic() - written > self.STATUS_EVERY_S:
                if now != shown:
                    log.info("broker %s", "connected" if now else "connection lost; reconnecting")
                shown, written, self._status_due = now, time.monotonic(), False
                try:
                    self._write_status()
                except Exception:  # a full disk must not end the loop that watches the broker connection
                    log.exception("cannot write %s", self.paths.status)

    def _shutdown(self) -> None:
        log.info("stopping node '%s'", self.node_id)
        self._stopping = True
        self.stop_event.set()
        if self.queue is not None:
            self.queue.wake()
        self.worker.terminate()  # an in-flight task stays unacked and runs again at the next start
        if self._runner is not None:
            self._runner.join(timeout=10)
        self.worker.kill()
        self._dispatch.shutdown(wait=True, cancel_futures=True)
        self.messaging.stop(farewell=(topics.presence(self.node_id), self._presence(False)))
        if self.queue is not None:
            self.queue.close()
        if self._seen is not None:
            self._seen.close()
        if self._filestore is not None:
            self._filestore.close()
        with contextlib.suppress(FileNotFoundError):
            self.paths.status.unlink()
        log.info("node '%s' stopped", self.node_id)

    # ------------------------------------------------------------------ status.json for the GUI
    def _write_status(self) -> None:
        with self._status_lock:
            data = {
                "pid": os.getpid(),
                "node_id": self.node_id,
                "started_at": self._started_at,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "broker_connected": self.messaging.connected,
                "receiver_restarts": self.messaging.restarts,
                "worker_pid": self.worker.pid,
                "sandbox": self.worker.sandbox.as_status(),
                "queued": self.queue.size if self.queue is not None else 0,
                "current_task": self._current,
            }
            tmp = self.paths.status.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
            os.replace(tmp, self.paths.status)
            self._status_worker_pid = data["worker_pid"]

    def _presence(self, online: bool) -> Presence:
        return Presence(
            sender=self.node_id, node_id=self.node_id, node_name=self.cfg.node.name, online=online, version=__version__
        )

    def _on_connected(self) -> None:
        self.messaging.publish(topics.presence(self.node_id), self._presence(True), retain=True)
        self._dispatch_safe(self._write_status)

    # ------------------------------------------------------------------ incoming
    def _dispatch_safe(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the executor is already shut down
            self._dispatch.submit(self._guarded, fn, *args)

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("handler %s failed", getattr(fn, "__name__", fn))

    def _on_message(self, message: Message, topic: str) -> None:
        researcher = topics.publisher(topic)
        if not getattr(message, "kind", "").endswith("_request") or not researcher:
            log.debug("ignoring %s on %s", getattr(message, "kind", "?"), topic)
            return
        self._dispatch_safe(self._handle, message, researcher)

    def _on_invalid(self, exc: MessageError, topic: str) -> None:
        researcher = topics.publisher(topic)  # the ACL proves who published; the payload may say anything
        if not researcher:
            return
        if isinstance(exc, UntrustedMessage):  # refused before parsing: unsigned, forged, unknown or wrong role
            self._dispatch_safe(self._refuse, researcher, exc.request_id or "unknown", exc.code, exc.reason,
                                {"signer": exc.signer})  # fmt: skip
            return
        code, stage = ErrorCode.MALFORMED_MESSAGE, "receive"
        if exc.field.split(".")[0] in ("training_args", "algorithm", "compression"):  # validated once, here
            code, stage = ErrorCode.TRAINING_ARGS_INVALID, "arguments"
        self._dispatch_safe(self._error, researcher, exc.request_id or "unknown", code, exc.reason, stage)

    def _answer(self, kind: type[R], request: Message | str, **fields: Any) -> R:
        return kind.for_request(request, self.node_id, self.cfg.node.name, **fields)

    def _topic(self, researcher: str) -> str:
        return topics.researcher(researcher, self.node_id)

    def _reply(self, to: str, message: Message | bytes) -> None:
        self.messaging.publish_raw(self._topic(to), message if isinstance(message, bytes) else message.to_wire())

    def _error(self, to: str, request_id: str, code: ErrorCode, text: str, stage: str, **extra: Any) -> None:
        log.info("[%s] refused request from %s: [%s] %s", request_id, to, code, text)
        self._reply(to, self._answer(ErrorReply, request_id, code=code, message=text[:3900], stage=stage, **extra))

    def _refuse(self, researcher: str, request_id: str, code: ErrorCode | None, reason: str,
                details: dict[str, Any] | None = None, stage: str = "receive", **extra: Any) -> None:  # fmt: skip
        """A request refused on who sent it: a WARNING, an audit `request_refused` (actor = the party that
        published it, as the ACL proves), and an error reply to that party unless `code` is None."""
        log.warning("[%s] request published by %s refused: %s", request_id, researcher, reason)
        self.audit().record("request_refused", f"researcher:{researcher}", request_id=request_id, reason=reason,
                            code=str(code or ""), **(details or {}))  # fmt: skip
        if code is not None:
            self._error(researcher, request_id, code, reason, stage, **extra)

    def _admissible(self, msg: Message, researcher: str) -> bool:
        """Checks every request passes, in order: the sender it names is the party that published it (and
        signed it: `Messaging` checked), it is no replay, it is fresh, both sides speak the same protocol, and
        this node takes requests from that researcher. A refusal is answered to the real publisher and logged."""
        if msg.sender != researcher:
            lie = f"the request says it comes from {msg.sender!r} but was published by {researcher!r}"
            self._refuse(researcher, msg.request_id, ErrorCode.SENDER_MISMATCH, lie)
            return False
        assert self._seen is not None
        if self._seen.replayed(researcher, msg.request_id, msg.timestamp):
            # Not answered: a QoS 1 redelivery looks exactly like a replay, and the first copy was answered;
            # a researcher that still waits re-sends with a fresh timestamp, which is admitted.
            self._refuse(researcher, msg.request_id, None, "replay: a copy of this request as new or newer "
                         "was accepted before", {"timestamp": msg.timestamp, "signer": msg.signer})  # fmt: skip
            return False
        if msg.protocol_version != PROTOCOL_VERSION:
            self._error(researcher, msg.request_id, ErrorCode.UNSUPPORTED_PROTOCOL,
                        f"node speaks protocol {PROTOCOL_VERSION}, message has {msg.protocol_version}",
                        "receive")  # fmt: skip
            return False
        age, node = time.time() - msg.timestamp, self.cfg.node
        if age > node.request_max_age_s + node.clock_skew_s or age < -node.clock_skew_s:
            when = f"{age:.0f}s old" if age > 0 else f"{-age:.0f}s in the future"
            self._error(researcher, msg.request_id, ErrorCode.REQUEST_EXPIRED,
                        f"request stamped {when}; this node accepts requests up to {node.request_max_age_s:g}s old "
                        f"with {node.clock_skew_s:g}s of clock skew", "receive")  # fmt: skip
            return False
        self._seen.record(researcher, msg.request_id, msg.timestamp)
        if not node_permits(node.researchers, researcher):
            self._refuse(researcher, msg.request_id, ErrorCode.RESEARCHER_NOT_ALLOWED,
                         f"node '{node.name}' does not take requests from researcher {researcher!r}")  # fmt: skip
            return False
        return True

    def audit(self) -> Any:
        if self._audit is None:
            from .audit import AuditLog

            self._audit = AuditLog(self.cfg.dir)
        return self._audit

    def _info(self, record: dict[str, Any]) -> Any:
        """A dataset as researchers see it: described with the names its data loading plan serves (`T1w`)."""
        return self.datasets.info(attach_loading_plan(record, self.cfg.paths.root), self.cfg.node.min_count)

    def _handle(self, msg: Message, researcher: str) -> None:
        if not self._admissible(msg, researcher):
            return
        if isinstance(msg, TaskRequest) and self._answer_duplicate(msg, researcher):
            return  # a re-sent copy (a newer timestamp): answered with the request's state
        if isinstance(msg, PingRequest):
            self._reply(msg.sender, self._answer(PingReply, msg, version=__version__, busy=self._current is not None))
        elif isinstance(msg, SearchRequest):
            infos = [self._info(r) for r in self._usable(self.datasets.search(msg.tags), researcher)]
            log.info("search %s from %s: %d dataset(s) match", msg.tags, researcher, len(infos))
            self._reply(msg.sender, self._answer(SearchReply, msg, datasets=infos))
        elif isinstance(msg, ListRequest):
            infos = [self._info(r) for r in self._usable(self.datasets.list(), researcher)]
            self._reply(msg.sender, self._answer(ListReply, msg, datasets=infos))
        elif isinstance(msg, PlanStatusRequest):
            self._reply(
                msg.sender,
                self._answer(
                    PlanStatusReply,
                    msg,
                    plan_sha256=msg.plan_sha256,
                    status=self.plans.status(msg.plan_sha256),
                    approval_required=self.cfg.node.require_approval,
                ),
            )
        elif isinstance(msg, ApprovalRequest):
            self._handle_approval(msg)
        elif self.secagg.handles(msg):
            self._reply(msg.sender, self.secagg.answer(msg, self._answer))  # type: ignore[arg-type]
        elif isinstance(msg, TaskRequest):  # training and evaluation: the same checks, queue and worker
            if (why := secagg_refusal(msg, self.cfg)) is not None:
                self._error(msg.sender, msg.request_id, ErrorCode.SECAGG_REQUIRED, why, "secure_aggregation",
                            job_id=msg.job_id, round=msg.round)  # fmt: skip
            else:
                self._handle_train(msg)

    def _usable(self, records: list[dict[str, Any]], researcher: str) -> list[dict[str, Any]]:
        """The datasets `researcher` may use: a researcher is not told about datasets closed to it."""
        return [r for r in records if self.access.permits(r["dataset_id"], researcher)]

    def _answer_duplicate(self, msg: TaskRequest, researcher: str) -> bool:
        """A request id seen before gets its current state again: its ack while it is queued or running,
        its reply once done. Requesters re-send what they have no answer for (a broker may have lost it)."""
        assert self.queue is not None
        state = self.queue.seen(msg.request_id)
        if state is None or msg.sender != researcher:
            return False
        reply = self.queue.reply(msg.request_id) if state == "done" else None
        log.info("[%s] re-sent request (%s): answering again", msg.request_id, state)
        if reply is not None:
            self._reply(researcher, reply)
        elif state != "done":
            self._reply(researcher, self._answer(TaskAck, msg, job_id=msg.job_id, round=msg.round))
        return True

    def _handle_approval(self, msg: ApprovalRequest) -> None:
        from .stages import classify
        from .transfer import fetch_plan_source

        try:  # the round's own fetch and checks (transfer.py); the codes from its table, the stage "approval"
            source = fetch_plan_source(self._files(), msg.plan)
        except FedsiloError as exc:
            self._error(msg.sender, msg.request_id, classify(exc, "approval", ErrorCode.INTERNAL)[0], str(exc),
                        "approval")  # fmt: skip
            return
        rec = self.plans.submit(source, msg.plan_name, msg.sender, msg.description)
        self._reply(msg.sender, self._answer(ApprovalReply, msg, plan_sha256=rec["sha256"], status=rec["status"]))

    def _handle_train(self, msg: TaskRequest) -> None:
        assert self.queue is not None
        extra = {"job_id": msg.job_id, "round": msg.round}
        try:
            record = self.datasets.get(msg.dataset_id)
        except UnknownDataset as exc:
            self._error(msg.sender, msg.request_id, ErrorCode.UNKNOWN_DATASET, str(exc), "dataset_lookup", **extra)
            return
        if not self.access.permits(record["dataset_id"], msg.sender):
            reason = f"researcher {msg.sender!r} is not allowed on dataset {record['dataset_id']} of node " \
                     f"'{self.cfg.node.name}'"  # fmt: skip
            self._refuse(msg.sender, msg.request_id, ErrorCode.DATASET_NOT_ALLOWED, reason,
                         {"dataset_id": record["dataset_id"]}, "dataset_lookup", **extra)  # fmt: skip
            return
        # Refused now when the store already says no (cheap); an unknown plan goes on to the worker, which
        # fetches it and records it as pending; the worker checks again (approval may be revoked meanwhile).
        status = self.plans.status(msg.plan.sha256)
        if self.cfg.node.require_approval and status in ("pending", "rejected"):
            code = ErrorCode.PLAN_REJECTED if status == "rejected" else ErrorCode.PLAN_NOT_APPROVED
            note = f": {self.plans.get(msg.plan.sha256).get('note') or 'no note'}" if status == "rejected" else ""
            self._error(msg.sender, msg.request_id, code, f"plan {msg.plan.sha256} ('{msg.plan_name}') is {status} "
                        f"on node '{self.cfg.node.name}'{note}", "plan_check", **extra)  # fmt: skip
            return
        item = {"request": msg.to_wire(), "reply_to": msg.sender, "signature": msg.signature}
        if self.queue.put(msg.request_id, item, parsed=msg):
            log.info("[%s] queued: job %s round %d from %s, dataset %s, plan %s (%d in queue)", msg.request_id,
                     msg.job_id, msg.round, msg.sender, msg.dataset_id, msg.plan.sha256[:12],
                     self.queue.size)  # fmt: skip
            self._reply(msg.sender, self._answer(TaskAck, msg, job_id=msg.job_id, round=msg.round))
            self.status_changed()

    def _files(self) -> Any:
        if self._filestore is None:
            from fedsilo.network.filestore_client import FileStoreClient

            self._filestore = FileStoreClient(self.creds.filestore, self.cfg.timeouts)
        return self._filestore

    # ------------------------------------------------------------------ task runner
    def _run_tasks(self) -> None:
        """The `fedsilo-tasks` thread (runner.py). The daemon never imports torch (only its worker does): its round
        stages work on numpy arrays (tests/unit/test_daemon_numpy.py)."""
        from .runner import TaskRunner

        runner = TaskRunner(self)
        runner.node.secagg = self.secagg  # one session store: the dispatcher answers stages, the runner masks
        runner.run()


def run(config: NodeConfig) -> None:
    """`fedsilo node start`: run the daemon in the foreground; exits non-zero if it could not go on."""
    keep_freed_memory()  # each round's blobs (a 40 MB model in, an update out) reuse the last round's pages
    daemon = NodeDaemon(config)
    daemon.run()
    if daemon.exit_code:
        raise SystemExit(daemon.exit_code)
