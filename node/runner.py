"""The daemon's task runner: feeds the durable queue to the worker, one round at a time.

A round: the daemon's stages before the worker (`daemon_round.BEFORE_WORKER`: plan, approval, caps,
dataset, blobs), the worker (plan code, no credentials), the daemon's stages after it (checks, clip and
noise, upload, algorithm state), then the reply, published until the broker acknowledges it; the queue
item is acked only then.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fedsilo.common.errors import ErrorCode, WorkerProtocolError
from fedsilo.network.message_base import inline_bytes
from fedsilo.network.messages import (
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    LogMessage,
    Message,
    MessageError,
    ScalarMessage,
    TrainReply,
    TrainRequest,
    parse_message,
    parse_task,
)

from .daemon_round import AFTER_WORKER, BEFORE_WORKER, DaemonRound, NodeResources
from .metric_bounds import bound_reply_metrics
from .stages import RoundFailure, run_stages
from .worker import WorkerCrashed

if TYPE_CHECKING:
    from .daemon import NodeDaemon

log = logging.getLogger("fedsilo.node.runner")

REPLY_HEADER_BYTES = 16 * 1024 * 1024
"""Room for a result frame's header (metrics, applied caps) besides its blobs."""


class _Outcome(BaseModel):
    """A worker's result header, checked: the worker runs plan code and may send anything."""

    model_config = ConfigDict(extra="ignore")
    ok: bool
    sample_size: int = Field(0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    applied_caps: dict[str, Any] = Field(default_factory=dict)
    train_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    test_samples: int = Field(0, ge=0)
    device: dict[str, Any] | None = None
    code: str = ""
    message: str = ""
    stage: str = ""
    stage_s: dict[Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")],
                  Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(default_factory=dict, max_length=32)
    """The worker's stage timings (`round.execute_round`), shown in the reply as `worker.<stage>`."""


class TaskRunner:
    """The daemon's `fedsilo-tasks` thread."""

    def __init__(self, daemon: NodeDaemon) -> None:
        from fedsilo.network.filestore_client import FileStoreClient

        self.d = daemon
        cfg = daemon.cfg
        # A client of its own: the dispatcher thread uses the daemon's for approval requests meanwhile.
        self.node = NodeResources(cfg, daemon.datasets, daemon.plans, daemon.audit(),
                                  FileStoreClient(daemon.creds.filestore, cfg.timeouts))  # fmt: skip

    def run(self) -> None:
        d = self.d
        assert d.queue is not None
        try:
            while not d.stop_event.is_set():
                if not d.worker.alive:
                    try:
                        d.worker.start()
                        d.status_changed()
                    except WorkerCrashed as exc:
                        log.error("worker start failed: %s; retrying", exc)
                        d.stop_event.wait(5.0)  # back-off only on this failure path
                        continue
                item = d.queue.get(d.stop_event)
                if item is None:
                    break
                self.run_one(item)
        finally:
            self.node.files.close()

    def run_one(self, item: dict[str, Any]) -> None:
        d = self.d
        assert d.queue is not None
        data = item["data"]
        rid, reply_to = data["request_id"], data["reply_to"]
        request = d.queue.take_parsed(rid) or parse_task(data["request"])
        if data.get("signature"):  # the daemon queues only what its signer (= reply_to) signed
            request._signature = (reply_to, data["signature"])
        if d.queue.seen(rid) == "done":  # queued twice by a redelivery; answered already
            d.queue.done(item)
            return
        d._current = {"request_id": rid, "job_id": request.job_id, "round": request.round,
                      "dataset_id": request.dataset_id, "started_at": time.time()}  # fmt: skip
        d.status_changed()
        topic = d._topic(reply_to)
        started = time.monotonic()
        log.info("[%s] round started: job %s round %d for %s, dataset %s, plan %s", rid, request.job_id,
                 request.round, reply_to, request.dataset_id, request.plan.sha256[:12])  # fmt: skip
        try:
            reply = self.execute(rid, request, topic)
        finally:
            d._current = None
        if reply is None:
            log.info("[%s] interrupted by shutdown; it will run again at the next start", rid)
            return
        log.info("[%s] round finished: job %s round %d: %s in %.2fs", rid, request.job_id, request.round,
                 _outcome(reply), time.monotonic() - started)  # fmt: skip
        raw = reply.to_wire()
        if self.publish_reliably(topic, raw):  # kept for re-sent copies; without inline data once older
            d.queue.done(item, raw, reply.to_json(inline=False) if inline_bytes(reply) else None)
            # Done with the update it uploaded: the researcher it was handed to holds it until it has read it (a
            # copy of this request sent again is answered from the queue). What it read is the uploader's to release.
            self.node.files.release_all(getattr(reply, "blobs", {}).values())
        else:
            log.error("[%s] reply not acknowledged by the broker; the task stays queued", rid)
        d.status_changed()

    def execute(self, rid: str, request: TrainRequest | EvaluateRequest, topic: str) -> Message | None:
        """The round's reply (TrainReply, EvaluateReply or ErrorReply), audited; None when the daemon stops
        meanwhile. An evaluation skips every stage after the worker: nothing of it is ever uploaded."""
        scratch = Path(tempfile.mkdtemp(prefix="fedsilo-task-"))
        r = DaemonRound(request, self.node, scratch)
        audit = {"plan_sha256": request.plan.sha256, "dataset_id": request.dataset_id, "job_id": request.job_id,
                 "round": request.round, "request_id": rid, "signed_by": request.signer,
                 "signature": request.signature}  # fmt: skip
        try:
            run_stages(BEFORE_WORKER, r, rid, r.stage_s)
            t_worker = time.perf_counter()
            outcome = self._in_worker(rid, r, topic)
            r.stage_s["worker"] = time.perf_counter() - t_worker
            rows = _rows(r.record)  # secure aggregation weighs the update by the count the reply will carry
            r.sample_size = outcome.sample_size if rows is None else min(outcome.sample_size, rows)
            if not outcome.ok:
                code = outcome.code if outcome.code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
                raise RoundFailure(ErrorCode(code), outcome.message, outcome.stage or "round")
            if isinstance(request, EvaluateRequest):
                reply: Message = self._evaluate_reply(r, outcome)
            else:
                run_stages(AFTER_WORKER, r, rid, r.stage_s)
                reply = self._train_reply(r, outcome)
        except RoundFailure as exc:
            reply = self._error(request, exc.code, exc.message, exc.stage)
        except (WorkerCrashed, WorkerProtocolError, ValidationError) as exc:
            if self.d._stopping and isinstance(exc, WorkerCrashed):
                return None
            log.error("[%s] %s; restarting the worker", rid, exc)
            self.d.worker.kill()
            reply = self._error(request, ErrorCode.WORKER_CRASHED, f"the training worker died during this round "
                                f"({type(exc).__name__}: {str(exc)[:500]})", "training")  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        outcome_fields = {"outcome": "ok", "sample_size": reply.sample_size} if isinstance(  # type: ignore[attr-defined]
            reply, TrainReply | EvaluateReply) else {"outcome": str(reply.code), "stage": reply.stage}  # fmt: skip
        if isinstance(request, EvaluateRequest):
            outcome_fields["task"] = "evaluate"
        try:
            self.node.audit.record("round_executed", f"researcher:{request.sender}", **outcome_fields, **audit)
        except Exception:
            log.exception("[%s] could not write the audit entry", rid)
        return reply

    def _in_worker(self, rid: str, r: DaemonRound, topic: str) -> _Outcome:
        assert r.args is not None
        # Without inline data: the worker gets the blobs as frames (`r.blobs`), not again as base64 in its task.
        header = {"request": r.request.to_json(inline=False).decode("utf-8"), "source": r.source,
                  "args": r.args.model_dump(mode="json"),
                  "record": r.record, "config": self.node.config.model_dump(mode="json"),
                  "state_dir": str(r.state_dir), "sent_at": time.perf_counter(),
                  "job": f"{r.request.sender}/{r.request.job_id}"}  # fmt: skip
        room = 4 * sum(len(b) for b in r.blobs.values()) + REPLY_HEADER_BYTES
        result, blobs = self.d.worker.run(rid, header, r.blobs, lambda ev: self._event(r.request, topic, ev), room)
        r.blobs = {}  # handed over; the daemon keeps the parsed global parameters only
        r.worker_blobs = blobs
        return _Outcome.model_validate(result)

    def _event(self, request: TrainRequest | EvaluateRequest, topic: str, event: dict[str, Any]) -> None:
        """A scalar or log line the worker streams, published only when it is one, from this node, about this
        job: plan code can write to the worker's socket, and a forged reply must not reach the researcher."""
        try:
            msg = parse_message(str(event.get("message", "")).encode("utf-8"))
        except MessageError as exc:
            log.warning("[%s] the worker sent an unreadable event (%s): dropped", request.request_id, exc.reason)
            return
        node_id = self.d.node_id
        if not isinstance(msg, ScalarMessage | LogMessage) or msg.sender != node_id or msg.node_id != node_id \
                or msg.job_id != request.job_id:  # fmt: skip
            log.warning("[%s] the worker sent a %s event that is not this round's: dropped", request.request_id,
                        getattr(msg, "kind", "?"))  # fmt: skip
            return
        self.d.messaging.publish_raw(topic, msg.to_json())

    def _train_reply(self, r: DaemonRound, outcome: _Outcome) -> TrainReply:
        request, cfg = r.request, self.node.config
        sample_size, applied = outcome.sample_size, {**outcome.applied_caps, **r.applied}
        rows = _rows(r.record)
        if rows is not None and sample_size > rows:  # the trainer never counts more; a tampered worker might
            applied["sample_size"] = {"requested": sample_size, "applied": rows}
            sample_size = rows
        test_samples = outcome.test_samples if rows is None else min(outcome.test_samples, rows - sample_size)
        timings = {"download_s": r.download_s, "train_s": outcome.train_s, "upload_s": r.upload_s,
                   "total_s": time.perf_counter() - r.started, **_stage_timings(r, outcome)}  # fmt: skip
        return TrainReply.for_request(request, cfg.node.node_id, cfg.node.name, job_id=request.job_id,
                                      round=request.round, dataset_id=request.dataset_id, blobs=r.reply_blobs,
                                      sample_size=sample_size, timings=timings, metrics=_bounded(r, outcome),
                                      applied_caps=applied, test_samples=test_samples,
                                      device=outcome.device or None)  # fmt: skip

    def _evaluate_reply(self, r: DaemonRound, outcome: _Outcome) -> EvaluateReply:
        """Numbers only: whatever blobs the worker returned are dropped unread (an evaluation has no update)."""
        request, cfg = r.request, self.node.config
        rows = _rows(r.record)
        samples = outcome.test_samples if rows is None else min(outcome.test_samples, rows)
        timings = {"download_s": r.download_s, "total_s": time.perf_counter() - r.started}
        r.worker_blobs = {}
        return EvaluateReply.for_request(request, cfg.node.node_id, cfg.node.name, job_id=request.job_id,
                                         round=request.round, dataset_id=request.dataset_id, sample_size=samples,
                                         timings=timings, metrics=_bounded(r, outcome),
                                         device=outcome.device or None)  # fmt: skip

    def _error(self, request: TrainRequest | EvaluateRequest, code: ErrorCode, message: str, stage: str) -> ErrorReply:
        cfg = self.node.config
        return ErrorReply.for_request(request, cfg.node.node_id, cfg.node.name, code=code, message=message[:3900],
                                      stage=stage, job_id=request.job_id, round=request.round)  # fmt: skip

    def publish_reliably(self, topic: str, reply: bytes) -> bool:
        """Publish and wait for the broker's PUBACK; re-send after a reconnect. False if it never came."""
        messaging = self.d.messaging
        deadline = time.monotonic() + self.node.config.timeouts.transfer
        while True:
            info = messaging.publish_raw(topic, reply)
            remaining = deadline - time.monotonic()
            try:
                info.wait_for_publish(timeout=max(remaining, 0.1))
                if info.is_published():
                    return True
            except (RuntimeError, ValueError):
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not messaging.wait_connected(remaining):
                return False


def _bounded(r: DaemonRound, outcome: _Outcome) -> dict[str, float]:
    """The worker's metrics within the node's bounds (`metric_bounds.py`): the worker runs plan code."""
    metrics, reasons = bound_reply_metrics(outcome.metrics, r.node.config.limits)
    for text in reasons:
        log.warning("[%s] %s", r.request.request_id, text)
    return metrics


def _stage_timings(r: DaemonRound, outcome: _Outcome) -> dict[str, float]:
    """Where the node's round went: the daemon's stages by name, `worker` (the exchange with the worker, fork
    included) and the worker's own stages as `worker.<stage>`."""
    return {**r.stage_s, **{f"worker.{name}": s for name, s in outcome.stage_s.items()}}


def _rows(record: dict[str, Any]) -> int | None:
    """The samples the node counted when the dataset was added (shape[0]); None when unknown."""
    shape = record.get("shape")
    return shape[0] if isinstance(shape, list) and shape and type(shape[0]) is int else None


def _outcome(reply: Message) -> str:
    """'ok, N samples' or '[FSxxx] at <stage>: message', for the node's log."""
    if isinstance(reply, ErrorReply):
        return f"[{reply.code}] at {reply.stage}: {reply.message[:200]}"
    return f"ok, {getattr(reply, 'sample_size', '?')} samples"
