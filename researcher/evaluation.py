"""Evaluation on the researcher's side: the federation's metrics of each round, and evaluation-only jobs.

Two sources, one rule (the algorithm's `aggregate_evaluate`, by default the mean weighted by each node's
test split, so that a metric is what it would be on the union of the splits):

- A training round: with `test_on_global_updates`, each node tests the model it received before training
  (reply metrics `global_<name>`); with `test_on_local_updates` (on by default), its update after training
  (`test_<name>`); `TrainReply.test_samples` is the split both were computed on. `round_evaluation` folds
  one round's replies into `{"global_<name>": ..., "test_<name>": ...}` for the history and TensorBoard.
- `Experiment.evaluate()`: `EvaluationJob` sends the current global model to every node of the experiment
  as an `EvaluateRequest`; each node tests it on its test split (its whole dataset when `test_ratio` is 0)
  and answers an `EvaluateReply`, which carries numbers and no blob: nothing leaves the node but metrics.

    report = exp.evaluate()
    print(report.metrics)                # {"accuracy": 0.87, "loss": 0.31}: the weighted means
    print(report.nodes["hospital-a"])    # NodeEvaluation(node_id, sample_size, metrics)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fedsilo.common.errors import ConfigError, FedsiloError
from fedsilo.network.messages import BlobRef, ErrorReply, EvaluateReply, EvaluateRequest, Message, Presence

from .algorithms.base import FedAlgorithm, NodeEvaluation, NodeTask
from .history import EVALUATION_PREFIXES, RoundRecord, validation_of
from .requests import remote_error
from .round import RoundContext, task_requests
from .strategies import Drop
from .update_checks import InvalidUpdate, check_reply

log = logging.getLogger(__name__)


class EvaluationFailed(FedsiloError):
    """No node answered an evaluation; the message says what happened to each."""


@dataclass
class EvaluationReport:
    """What `Experiment.evaluate()` returns: the global model after `round` rounds, as each node and the
    federation (`metrics`, the algorithm's `aggregate_evaluate`) measured it; `dropped` says who did not answer.

        report = exp.evaluate()
        report.metrics["accuracy"], report.nodes["hospital-a"].sample_size
    """

    round: int
    metrics: dict[str, float]
    nodes: dict[str, NodeEvaluation] = field(default_factory=dict)
    dropped: dict[str, Drop] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The plain form kept in the history (and breakpoints)."""
        return {
            "round": self.round,
            "metrics": dict(self.metrics),
            "nodes": {n: {"sample_size": e.sample_size, "metrics": dict(e.metrics)} for n, e in self.nodes.items()},
            "dropped": {n: d.as_dict() for n, d in self.dropped.items()},
        }


def round_evaluation(record: RoundRecord, algorithm: FedAlgorithm) -> dict[str, float]:
    """A training round's federation metrics: for each prefix (`global_`, `test_`), the nodes' metrics of that
    side (prefix removed, weight `test_samples`) folded by `algorithm.aggregate_evaluate`, prefix put back."""
    out: dict[str, float] = {}
    for prefix in EVALUATION_PREFIXES:
        results = []
        for node, result in sorted(record.nodes.items()):
            side = {k.removeprefix(prefix): v for k, v in result.metrics.items() if k.startswith(prefix)}
            if result.dropped is None and side:
                results.append(NodeEvaluation(node, result.test_samples, side))
        if results:
            out.update({f"{prefix}{k}": float(v) for k, v in algorithm.aggregate_evaluate(results).items()})
    return out


def node_validation(record: RoundRecord) -> dict[str, dict[str, float]]:
    """Node -> its evaluation metrics (`global_*`, `test_*`) in a training round (nodes not dropped)."""
    return {n: validation_of(r.metrics) for n, r in record.nodes.items() if r.dropped is None}


class EvaluationJob:
    """Evaluates the models `configure_evaluate` names on every node of `ctx.training_data` (see the module
    docstring); `run()` returns the report, or raises `EvaluationFailed` when no node answered.

    A node offline when the job starts, one that answers with an error, one whose answer fails the checks
    (another dataset, more test samples than it reported holding) and one silent past `ctx.timeout` are
    dropped with the reason; the others' metrics make the report."""

    def __init__(self, ctx: RoundContext, rounds_done: int) -> None:
        self.ctx = ctx
        self.rounds_done = rounds_done
        self.results: dict[str, NodeEvaluation] = {}
        self.dropped: dict[str, Drop] = {}
        self._node_of: dict[str, str] = {}
        self._pending: set[str] = set()
        self._uploaded: list[BlobRef] = []  # the model this researcher stored for it (released once it ends)

    def run(self) -> EvaluationReport:
        ctx = self.ctx
        online = {n: s.online for n, s in ctx.requests.nodes().items()}
        nodes = []
        for node in sorted(ctx.training_data):
            if online.get(node) is False:  # unknown presence still gets the request: the broker queues it
                self.dropped[node] = Drop(node, "offline", "offline when the evaluation started")
            else:
                nodes.append(node)
        outgoing = self._requests(ctx.algorithm.configure_evaluate(self.rounds_done, nodes, ctx.global_params))
        req = ctx.requests
        with req.waiter(self._node_of, watch_presence=True) as waiter:
            for node, msg in outgoing.items():
                req.send(waiter, node, msg)  # re-sent until the node answers
            self._pending = set(outgoing)
            deadline = time.monotonic() + ctx.timeout
            while self._pending:
                msg = waiter.get(deadline)
                if msg is None:
                    break
                self._on_message(msg)
        ctx.files.release_all(self._uploaded)
        for node in sorted(self._pending):
            self.dropped[node] = Drop(node, "timeout", f"no reply within {ctx.timeout:g}s (round_timeout)")
        for node, drop in sorted(self.dropped.items()):
            log.warning("evaluation: node %s dropped: %s", ctx.name_of(node), drop.reason)
        if not self.results:
            detail = "; ".join(f"{ctx.name_of(n)}: {d.reason}" for n, d in sorted(self.dropped.items()))
            raise EvaluationFailed(
                f"evaluation of the model after {self.rounds_done} round(s): no node answered ({detail or 'no node'})"
            )
        metrics = ctx.algorithm.aggregate_evaluate([self.results[n] for n in sorted(self.results)])
        return EvaluationReport(self.rounds_done, dict(metrics), dict(sorted(self.results.items())), self.dropped)

    def _requests(self, tasks: dict[str, NodeTask]) -> dict[str, EvaluateRequest]:
        """One EvaluateRequest per node; each distinct model is uploaded once (usually one for all)."""
        for node, task in tasks.items():
            if set(task.blobs) != {"params"}:
                raise ConfigError(f"{self.ctx.algorithm!r}.configure_evaluate gave node {node} blobs "
                                  f"{sorted(task.blobs)}; an evaluation sends one, 'params'")  # fmt: skip
        outgoing, self._uploaded = task_requests(self.ctx, tasks, self.rounds_done, EvaluateRequest)
        self._node_of = {msg.request_id: node for node, msg in outgoing.items()}
        return outgoing  # type: ignore[return-value]

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, Presence):
            if msg.node_id in self._pending and not msg.online:
                self._drop(msg.node_id, Drop(msg.node_id, "offline", "went offline during the evaluation"))
            return
        node = self._node_of.get(getattr(msg, "in_reply_to", ""))
        if node is None or node not in self._pending or getattr(msg, "node_id", node) != node:
            return  # a duplicate delivery, or a reply forged for another node's request
        if isinstance(msg, ErrorReply):
            err = remote_error(msg)
            self._drop(node, Drop(node, "error", str(err), err))
        elif isinstance(msg, EvaluateReply):
            try:
                if msg.job_id != self.ctx.job_id or msg.round != self.rounds_done:
                    raise InvalidUpdate(f"replied for job {msg.job_id} round {msg.round}")
                check_reply(msg, self.ctx.training_data.get(node))
            except InvalidUpdate as exc:
                self._drop(node, Drop(node, "invalid", str(exc)))
                return
            self._pending.discard(node)
            self.results[node] = NodeEvaluation(node, msg.sample_size, dict(msg.metrics))

    def _drop(self, node: str, drop: Drop) -> None:
        self._pending.discard(node)
        self.dropped[node] = drop

