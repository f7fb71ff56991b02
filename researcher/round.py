"""One training round on the researcher's side: the algorithm's tasks out, replies folded in as they arrive.

`TrainingRound` is the round loop that used to live in `Experiment._run_round`: the strategy picks the
nodes, the algorithm (`FedAlgorithm`) says what each node is sent (`configure_train`) and folds every
usable reply (`add`, then `result`), and the round policy (`Strategy.check_round`) decides whether the
round counts. Every reply is checked before the algorithm sees it (`update_checks`): the dataset and the
sample count against what the node reported, the blobs parsed as safetensors, compatible with the
model and finite. Anything unusable drops that node for the round, with the reason; the round goes on.
Updates are downloaded and checked on a few threads while the loop keeps taking replies (researcher/fetch.py);
each is folded in on the round's thread as soon as its download is done. A download still running at the
deadline drops its node as a timeout.

    record, new_global = TrainingRound(context, round_index=3, bar=bar).run()
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsilo.common.algorithms import AlgorithmSpec
from fedsilo.common.errors import SerializationError, TransferError
from fedsilo.common.secagg import SecaggError
from fedsilo.common.serialization import params_to_buffers
from fedsilo.common.training_args import TrainingArgs
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.message_base import INLINE_BLOB_BYTES
from fedsilo.network.messages import (
    BlobRef,
    DatasetInfo,
    ErrorReply,
    Message,
    Presence,
    ScalarMessage,
    TaskAck,
    TaskRequest,
    TrainReply,
    TrainRequest,
)

from .algorithms.base import AggregationError, FedAlgorithm, NodeTask, NodeUpdate, Params
from .compression import Compression
from .connection import Waiter
from .fetch import (
    FETCH_THREADS,
    LOAD_HERE_BYTES,
    RECEIVE_BUFFERS,
    ClientFactory,
    ClientPool,
    Fetched,
    Fetcher,
    UpdateLoader,
)
from .history import NodeResult, RoundRecord
from .monitor import Monitor
from .requests import Requests, remote_error
from .secagg import SecaggRound, SecureAggregation
from .strategies import Drop, RoundFailed, RoundOutcome, Strategy
from .update_checks import InvalidUpdate, check_reply

log = logging.getLogger(__name__)

OFFLINE_GRACE_S = 10.0
"""A sampled node whose last presence said offline when the round's request went out is dropped once it has
stayed offline this long, not at `round_timeout`. The grace lets a node whose presence flaps (a restarted
daemon, a broker restored with an older retained presence) come back and answer its re-sent request."""
BLOB_SLACK = 1 << 16
"""A node's blob may exceed the global model's size by this much (safetensors header, metadata)."""
_POOLS: dict[tuple[str, str, float], ClientPool] = {}
"""Download clients kept between rounds, per file store, token and read timeout (researcher/fetch.py)."""
_POOLS_LOCK = threading.Lock()


@dataclass
class RoundContext:
    """What a round needs from its experiment (built by `Experiment` for every round)."""

    job_id: str
    requests: Requests
    files: FileStoreClient
    algorithm: FedAlgorithm
    strategy: Strategy
    training_data: Mapping[str, DatasetInfo]
    plan: BlobRef
    plan_name: str
    model_args: dict[str, Any]
    training_args: TrainingArgs
    global_params: Params
    timeout: float
    monitor: Monitor
    name_of: Callable[[str], str] = str
    readers: list[str] = field(default_factory=list)
    """Parties allowed to download what the round uploads (every node of the experiment)."""
    secagg: SecureAggregation | None = None
    """Secure aggregation's settings when the experiment asks for it (researcher/secagg.py)."""
    compression: Compression | None = None
    """The codec of the nodes' `params` blobs (researcher/compression.py); None: plain safetensors."""
    download_client: ClientFactory | None = None
    """Makes the file-store client of one download thread (read timeout in s -> client); None: from the party's
    credentials (`requests.credentials`), as `files` is."""


class TrainingRound:
    """Runs one round (see the module docstring); `run()` returns its record and the new global model."""

    def __init__(self, ctx: RoundContext, round_index: int, bar: Any = None) -> None:
        self.ctx = ctx
        self.index = round_index
        self.bar = bar
        self.outcome = RoundOutcome(round_index, [])
        self.results: dict[str, NodeResult] = {}
        self._node_of: dict[str, str] = {}
        self._pending: set[str] = set()  # sent a request, no usable reply yet
        self._fetching: set[str] = set()  # replied; its blobs are being downloaded (researcher/fetch.py)
        self._offline_at_send: dict[str, float] = {}  # node -> when its request went out while it was offline
        self._fetcher: Fetcher | None = None
        self._fetch_s = 0.0
        self._sent_at = 0.0
        self._max_bytes = 0
        self._secagg: SecaggRound | None = None
        self._bytes_down = self._bytes_up = 0
        self._uploaded: list[BlobRef] = []  # the round's blobs this researcher stored (released once it ends)

    # ------------------------------------------------------------------ the template
    def run(self) -> tuple[RoundRecord, Params]:
        ctx, t_start = self.ctx, time.perf_counter()
        online = {n: s.online for n, s in ctx.requests.nodes().items()}
        sampled, dropped = ctx.strategy.sample_nodes(ctx.training_data, self.index, online)
        self.outcome = RoundOutcome(self.index, list(sampled), [], dict(dropped))
        if ctx.secagg is not None:  # the key and share stages first: only nodes that shared are sent the round
            self._secagg = SecaggRound(ctx.secagg, ctx, self.index, sampled)
            sampled = self._secagg_stage(lambda: self._secagg.prepare(self._drop))  # type: ignore[union-attr]
        tasks = ctx.algorithm.configure_train(self.index, list(sampled), ctx.global_params)
        outgoing = self._requests(tasks)
        ctx.algorithm.start_round(self.index, ctx.global_params)
        if self.bar is not None:
            self.bar.set_description(f"round {self.index}")
        stats = {"prepare_s": time.perf_counter() - t_start, "wait_s": 0.0, "handle_s": 0.0}
        req = ctx.requests
        with req.waiter(self._node_of, job_id=ctx.job_id, watch_presence=True) as waiter:
            self._sent_at = time.perf_counter()
            for node, msg in outgoing.items():
                req.send(waiter, node, msg)  # re-sent until the node answers
            self._pending = set(outgoing)
            states, now = req.nodes(), time.monotonic()
            self._offline_at_send = {n: now for n in self._pending if n in states and not states[n].online}
            self._collect(waiter, time.monotonic() + ctx.timeout, stats)
        ctx.files.release_all(self._uploaded)  # nodes still downloading it hold it until their round ends
        for node in sorted(self._pending):
            self.outcome.dropped[node] = Drop(node, "timeout", f"no reply within {ctx.timeout:g}s (round_timeout)")
        for node in sorted(self._fetching):
            self.outcome.dropped[node] = Drop(node, "timeout", f"its update was still downloading at the round's "
                                              f"deadline ({ctx.timeout:g}s, round_timeout)")  # fmt: skip
        stats["fetch_s"] = self._fetch_s
        ctx.strategy.check_round(self.outcome)
        if self._secagg is not None:  # the unmask stage: the weighted mean of the updates, as one update
            ctx.algorithm.add(self._secagg_stage(lambda: self._secagg.finish(self._drop)))  # type: ignore[union-attr]
            stats.update(self._secagg.stats)
        t_agg = time.perf_counter()
        new_params = ctx.algorithm.result()
        stats["aggregate_s"] = time.perf_counter() - t_agg
        RECEIVE_BUFFERS.trim()  # the updates an aggregator kept are free now: keep a few buffers, not K
        for node, drop in sorted(self.outcome.dropped.items()):
            log.warning("round %d: node %s dropped: %s", self.index, ctx.name_of(node), drop.reason)
            self.results[node] = NodeResult(node, ctx.name_of(node), dropped=drop)
        stats["wall_s"] = time.perf_counter() - t_start
        stats["bytes_down"], stats["bytes_up"] = self._bytes_down, self._bytes_up  # what the round moved
        return RoundRecord(self.index, dict(sorted(self.results.items())), stats), new_params

    # ------------------------------------------------------------------ requests out
    def _requests(self, tasks: Mapping[str, NodeTask]) -> dict[str, TrainRequest]:
        """One TrainRequest per node, with the algorithm's typed config."""
        outgoing, uploaded = task_requests(self.ctx, tasks, self.index, TrainRequest)
        self._uploaded = uploaded
        self._node_of = {msg.request_id: node for node, msg in outgoing.items()}
        self._bytes_down = sum(ref.size for msg in outgoing.values() for ref in msg.blobs.values())
        self._max_bytes = max((r.size for r in uploaded), default=0) * 2 + BLOB_SLACK
        if self._secagg is not None:  # each node's neighbours' encrypted shares ride with its train request
            outgoing = {n: m.model_copy(update={"secagg": self._secagg.task(n)}) for n, m in outgoing.items()}
            words = sum(t.numel() for t in self.ctx.global_params.values())
            self._max_bytes = max(self._max_bytes, 8 * words + BLOB_SLACK)  # the masked blob is int64
        return outgoing  # type: ignore[return-value]

    # ------------------------------------------------------------------ replies in
    def _collect(self, waiter: Waiter, deadline: float, stats: dict[str, float]) -> None:
        """Take messages until every sampled node's update is folded in or dropped, or until `deadline`.

        Updates are downloaded on fetch threads while the loop goes on taking replies (researcher/fetch.py);
        each finished download comes back through the waiter's queue and wakes the loop as a reply does."""
        workers = min(FETCH_THREADS, max(len(self._pending), 1))
        ctx = self.ctx
        load = UpdateLoader(ctx.global_params, self._max_bytes, ctx.compression, masked=self._secagg is not None)
        pool = self._client_pool()
        fetcher = Fetcher(load, waiter.queue.put, workers, pool, deadline)  # type: ignore[arg-type]
        with fetcher:
            self._fetcher = fetcher
            while self._pending or self._fetching:
                t_wait = time.perf_counter()
                grace_end = min(self._offline_at_send.values(), default=math.inf) + OFFLINE_GRACE_S
                msg = waiter.get(min(deadline, grace_end))
                t_got = time.perf_counter()
                stats["wait_s"] += t_got - t_wait
                if msg is None:
                    if time.monotonic() >= deadline:
                        return
                    self._drop_still_offline(ctx.requests.nodes())
                    continue
                self._on_message(msg)
                stats["handle_s"] += time.perf_counter() - t_got

    def _on_message(self, msg: Message | Fetched) -> None:
        if isinstance(msg, Fetched):
            self._on_fetched(msg)
            return
        if isinstance(msg, ScalarMessage):
            self._on_scalar(msg)
            return
        if isinstance(msg, Presence):
            if msg.online:
                self._offline_at_send.pop(msg.node_id, None)  # back: the connection re-sends its request
            elif msg.node_id in self._pending:
                self._drop(msg.node_id, "offline", "went offline during the round")
            return
        node = self._node_of.get(getattr(msg, "in_reply_to", ""))
        if node is None or node not in self._pending or getattr(msg, "node_id", node) != node:
            return  # a duplicate delivery, or a reply forged for another node's request
        if isinstance(msg, TaskAck):
            self.results.setdefault(node, NodeResult(node, self.ctx.name_of(node))).ack_s = self._elapsed()
        elif isinstance(msg, ErrorReply):
            err = remote_error(msg)
            self._drop(node, "error", str(err), err)
        elif isinstance(msg, TrainReply):
            self._on_train_reply(node, msg)

    def _on_scalar(self, msg: ScalarMessage) -> None:
        if msg.round != self.index or msg.node_id not in self.outcome.sampled:
            return
        self.ctx.monitor.on_scalar(msg)
        loss = self.ctx.monitor.mean_loss()
        if loss is not None and self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4g}", refresh=True)

    def _on_train_reply(self, node: str, msg: TrainReply) -> None:
        """Checked here; its blobs are downloaded on a fetch thread (`UpdateLoader`), folded in by `_on_fetched`."""
        ctx = self.ctx
        if msg.round != self.index or msg.job_id != ctx.job_id:
            self._drop(node, "invalid", f"replied for job {msg.job_id} round {msg.round}")
            return
        try:
            check_reply(msg, ctx.training_data.get(node))
            unexpected = sorted(msg.blobs.keys() - ctx.algorithm.reply_blobs)
            if unexpected:  # refused before anything is downloaded
                raise InvalidUpdate(f"sent blobs {unexpected} that {ctx.algorithm!r} does not take")
        except InvalidUpdate as exc:
            self._drop(node, "invalid", str(exc))
            return
        self._pending.discard(node)  # from here on another reply of this node is a duplicate, ignored
        self._fetching.add(node)
        assert self._fetcher is not None  # set by _collect, the only caller
        if sum(ref.size for ref in msg.blobs.values()) <= LOAD_HERE_BYTES:
            self._on_fetched(self._fetcher.fetch_here(node, msg, self.ctx.files))
        else:
            self._fetcher.submit(node, msg)

    def _on_fetched(self, done: Fetched) -> None:
        """A reply's blobs are in (or why not): its update is folded in here, on the round's thread."""
        node, msg = done.node, done.reply
        self._fetch_s += done.seconds
        self._fetching.discard(node)
        try:
            if done.error is not None:
                raise done.error  # what the loader raised on the fetch thread; anything unforeseen fails the round
            assert done.blobs is not None
            if self._secagg is not None:  # a masked int64 blob in the model's layout: summed, never read alone
                self._secagg.add(node, msg, done.blobs["params"])
            else:
                self.ctx.algorithm.add(NodeUpdate(node, done.blobs, msg.sample_size, dict(msg.metrics)))
        except InvalidUpdate as exc:
            self._drop(node, "invalid", str(exc))
            return
        except (TransferError, SerializationError, AggregationError, SecaggError) as exc:
            self._drop(node, "invalid", f"unusable update: {exc}")
            return
        finally:
            done.blobs = None  # folded or dropped: the next update may be taken out of the store
            self._fetcher.release()  # type: ignore[union-attr]
        ctx = self.ctx
        self.outcome.replied.append(node)
        self._bytes_up += sum(ref.size for ref in msg.blobs.values())
        result = self.results.setdefault(node, NodeResult(node, msg.node_name or ctx.name_of(node)))
        result.node_name = msg.node_name or result.node_name
        result.dataset_id, result.sample_size = msg.dataset_id, msg.sample_size
        result.timings = {**msg.timings, "researcher_s": self._elapsed()}
        result.metrics, result.applied_caps = dict(msg.metrics), dict(msg.applied_caps)
        result.test_samples = msg.test_samples  # the weight of its test_*/global_* metrics
        result.device = msg.device.model_dump() if msg.device is not None else {}

    def _client_pool(self) -> ClientPool:
        """The download threads' clients: from `ctx.download_client` for this round alone, or else like the
        experiment's own client (the party's credentials), kept for the party's later rounds (`_POOLS`)."""
        transfer = self.ctx.requests.timeouts.transfer
        if self.ctx.download_client is not None:
            return ClientPool(self.ctx.download_client, transfer, keep=0)
        settings, timeouts = self.ctx.requests.credentials.filestore, self.ctx.requests.timeouts
        key = (settings.url, settings.token, transfer)
        with _POOLS_LOCK:
            if key not in _POOLS:
                _POOLS[key] = ClientPool(
                    lambda t: FileStoreClient(settings, timeouts.model_copy(update={"transfer": t})), transfer
                )
            return _POOLS[key]

    def _secagg_stage(self, fn: Callable[[], Any]) -> Any:
        """A secure-aggregation stage; its failure fails the round (too few nodes left to hide each update)."""
        try:
            return fn()
        except SecaggError as exc:
            raise RoundFailed(f"round {self.index}: secure aggregation: {exc}") from None

    def _drop_still_offline(self, states: Mapping[str, Any]) -> None:
        """Nodes offline when the round's request went out and still offline `OFFLINE_GRACE_S` later: dropped (a node
        that died between rounds, or in secure aggregation's key-sharing stage, was waited for until round_timeout:
        60 s in `tests/e2e/test_secure_aggregation.py`)."""
        now = time.monotonic()
        for node, since in sorted(self._offline_at_send.items()):
            if now < since + OFFLINE_GRACE_S:
                continue
            del self._offline_at_send[node]
            state = states.get(node)
            if node in self._pending and state is not None and not state.online:
                self._drop(node, "offline", f"offline when the round's request went out and {OFFLINE_GRACE_S:g}s after")

    def _drop(self, node: str, kind: Any, reason: str, err: Any = None) -> None:
        self._pending.discard(node)
        self.outcome.dropped[node] = Drop(node, kind, reason, err)

    def _elapsed(self) -> float:
        return time.perf_counter() - self._sent_at


def task_requests(
    ctx: RoundContext, tasks: Mapping[str, NodeTask], round_index: int, kind: type[TaskRequest]
) -> tuple[dict[str, TaskRequest], list[BlobRef]]:
    """One request of `kind` per node, and the blobs sent with them: each distinct blob is serialised once
    (nodes usually share the global model: one upload, not K). A blob of at most `INLINE_BLOB_BYTES` goes inline
    in the requests (each on the topic of its one node: the broker's ACL lets no other node read it), while a
    request's inline blobs total at most that; any other is uploaded once, readable by the experiment's nodes."""
    uploaded: dict[int, BlobRef] = {}
    outgoing: dict[str, TaskRequest] = {}
    for node, task in tasks.items():
        refs, room = {}, INLINE_BLOB_BYTES
        for name, params in task.blobs.items():
            if id(params) not in uploaded:
                blob = params_to_buffers(params)  # sent from the tensors' memory, hashed once (issue 11)
                uploaded[id(params)] = BlobRef.inline(blob.tobytes()) if blob.size <= INLINE_BLOB_BYTES \
                    else ctx.files.upload_bytes(blob, readers=ctx.readers)  # fmt: skip
            ref = uploaded[id(params)]
            if ref.data is not None and ref.size > room:  # this request's inline room is spent: stored instead
                ref = uploaded[id(params)] = ctx.files.upload_bytes(ref.data, readers=ctx.readers)
            room -= ref.size if ref.data is not None else 0
            refs[name] = ref
        extra = {"algorithm": AlgorithmSpec.of(task.config), "compression": ctx.compression} \
            if kind is TrainRequest else {}  # fmt: skip
        outgoing[node] = kind(
            sender=ctx.requests.party,
            job_id=ctx.job_id,
            round=round_index,
            dataset_id=ctx.training_data[node].dataset_id,
            plan=ctx.plan,
            plan_name=ctx.plan_name,
            blobs=refs,
            training_args=ctx.training_args,
            model_args=ctx.model_args,
            **extra,
        )
    return outgoing, list(uploaded.values())
