"""What each round did, typed: `NodeResult` per node, `RoundRecord` per round, `History` for the experiment.

`Experiment.training_replies()` and `round_stats()` give the same data as plain dicts (the form
breakpoints store), and `History.metrics_table()` renders it for a notebook.

    history.add(record)
    print(history.metrics_table(per="round"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsilo.common.clitools import table

from .strategies import Drop

EVALUATION_PREFIXES = ("global_", "test_")
"""Reply metrics of evaluations: `global_<name>` tests the received global model before local training,
`test_<name>` the local update after it (both on the node's test split)."""

FEDERATION = "all nodes"
"""The row (and TensorBoard run) of the federation's values: no node name has a space."""


def validation_of(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation metrics (`global_*`, `test_*`) among a reply's metrics."""
    return {k: v for k, v in metrics.items() if k.startswith(EVALUATION_PREFIXES)}


@dataclass
class NodeResult:
    """One node in one round: what it reported, or why it was dropped."""

    node_id: str
    node_name: str = ""
    dataset_id: str = ""
    sample_size: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    applied_caps: dict[str, Any] = field(default_factory=dict)
    ack_s: float | None = None
    dropped: Drop | None = None
    test_samples: int = 0
    """The node's test split: the weight of its `test_*` and `global_*` metrics."""
    device: dict[str, Any] = field(default_factory=dict)
    """Where it trained (`TrainReply.device`: used, gpu_requested, fallback); empty from older nodes."""

    def as_dict(self) -> dict[str, Any]:
        """The plain form of `training_replies()` and breakpoints."""
        if self.dropped is not None:
            return {"node_name": self.node_name or self.node_id, "dropped": self.dropped.as_dict()}
        out: dict[str, Any] = {
            "node_name": self.node_name or self.node_id,
            "dataset_id": self.dataset_id,
            "sample_size": self.sample_size,
            "timings": dict(self.timings),
            "metrics": dict(self.metrics),
            "applied_caps": dict(self.applied_caps),
            "test_samples": self.test_samples,
            "dropped": None,
        }
        if self.device:
            out["device"] = dict(self.device)
        if self.ack_s is not None:
            out["ack_s"] = self.ack_s
        return out


@dataclass
class RoundRecord:
    """A finished round: its nodes' results and the researcher-side seconds (`wall_s`, `prepare_s`,
    `wait_s`, `handle_s`, `aggregate_s`)."""

    index: int
    nodes: dict[str, NodeResult]
    stats: dict[str, float]


class History:
    """Every finished round of an experiment, kept as the plain dicts breakpoints store.

    `round_metrics[r]`: the federation's evaluation metrics of round r, `global_<name>` (the model the nodes
    received) and `test_<name>` (their local updates), each the algorithm's `aggregate_evaluate` (by default
    the mean weighted by the nodes' test splits). `evaluations[r]`: what `Experiment.evaluate()` reported
    of the global model after r rounds (`EvaluationReport.as_dict()`)."""

    def __init__(self) -> None:
        self.replies: dict[int, dict[str, dict[str, Any]]] = {}
        self.stats: dict[int, dict[str, float]] = {}
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.evaluations: dict[int, dict[str, Any]] = {}

    def add(self, record: RoundRecord, round_metrics: dict[str, float] | None = None) -> None:
        self.replies[record.index] = {n: r.as_dict() for n, r in record.nodes.items()}
        self.stats[record.index] = dict(record.stats)
        self.round_metrics[record.index] = dict(round_metrics or {})

    def state(self) -> dict[str, Any]:
        return {
            "training_replies": {str(r): v for r, v in self.replies.items()},
            "round_stats": {str(r): v for r, v in self.stats.items()},
            "round_metrics": {str(r): v for r, v in self.round_metrics.items()},
            "evaluations": {str(r): v for r, v in self.evaluations.items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.replies = {int(r): v for r, v in state.get("training_replies", {}).items()}
        self.stats = {int(r): v for r, v in state.get("round_stats", {}).items()}
        self.round_metrics = {int(r): v for r, v in state.get("round_metrics", {}).items()}
        self.evaluations = {int(r): v for r, v in state.get("evaluations", {}).items()}

    def mean_loss(self, round_index: int) -> float | None:
        losses = [v["metrics"]["loss"] for v in self.replies.get(round_index, {}).values()
                  if "loss" in (v.get("metrics") or {})]  # fmt: skip
        return sum(losses) / len(losses) if losses else None

    # ------------------------------------------------------------------ views
    def metric_keys(self) -> list[str]:
        keys = sorted({k for nodes in self.replies.values() for v in nodes.values() for k in v.get("metrics", {})})
        return ["loss", *[k for k in keys if k != "loss"]] if "loss" in keys else keys

    def validation_metrics(self, key: str | None = None) -> dict[int, dict[str, Any]]:
        """Round -> {node name: its evaluation metrics, "all nodes": the federation's (the recorded weighted
        means)}; with `key` (e.g. "test_dice"), round -> {node name or "all nodes": that value}."""
        out: dict[int, dict[str, Any]] = {}
        for r in sorted(self.replies):
            rows = {v.get("node_name") or n: validation_of(v.get("metrics") or {})
                    for n, v in sorted(self.replies[r].items()) if not v.get("dropped")}  # fmt: skip
            rows[FEDERATION] = dict(self.round_metrics.get(r) or {})
            out[r] = rows if key is None else {who: m[key] for who, m in rows.items() if key in m}
        return out

    def metrics_table(self, metrics: Sequence[str] | None = None, per: str = "node") -> str:
        """Per round and node (status, samples, metrics, node and researcher timings); with `per="round"`
        one line a round with sample-weighted means over the nodes that were not dropped; with
        `per="validation"` the evaluation metrics of each node (test samples: its weight) and, under them,
        the federation's weighted value ("all nodes")."""
        if per not in ("node", "round", "validation"):
            raise ValueError("per must be 'node', 'round' or 'validation'")
        keys = list(metrics) if metrics is not None else self.metric_keys()
        if per == "round":
            return self._round_table(keys)
        if per == "validation":
            return self._validation_table([k for k in keys if k.startswith(EVALUATION_PREFIXES)])
        rows = []
        for r in sorted(self.replies):
            for node, v in sorted(self.replies[r].items()):
                dropped = v.get("dropped")
                values, timings = v.get("metrics", {}), v.get("timings", {})
                rows.append([r, v.get("node_name") or node, f"dropped: {dropped['reason']}" if dropped else "ok",
                             v.get("sample_size"), *[values.get(k) for k in keys], timings.get("total_s"),
                             timings.get("researcher_s")])  # fmt: skip
        headers = ["round", "node", "status", "samples", *keys, "node_total_s", "researcher_s"]
        return table(headers, rows, max_width=70)

    def _validation_table(self, keys: list[str]) -> str:
        rows = []
        for r, who in self.validation_metrics().items():
            samples = {v.get("node_name") or n: v.get("test_samples") for n, v in self.replies[r].items()}
            for name, values in who.items():
                weight = sum(n or 0 for n in samples.values() if n) if name == FEDERATION else samples.get(name)
                rows.append([r, name, weight, *[values.get(k) for k in keys]])
        return table(["round", "node", "test_samples", *keys], rows, max_width=70)

    def _round_table(self, keys: list[str]) -> str:
        """Training metrics weighted by the training samples; evaluation metrics (`global_*`, `test_*`) are
        the round's recorded `round_metrics` (weighted by the test splits), when the round has them (a round
        from before `test_samples` existed falls back to the training weights)."""
        rows = []
        for r in sorted(self.replies):
            replies = [v for v in self.replies[r].values() if not v.get("dropped")]
            samples = sum(v.get("sample_size") or 0 for v in replies)
            recorded = self.round_metrics.get(r) or {}
            means = []
            for k in keys:
                if k in recorded:
                    means.append(recorded[k])
                    continue
                pairs = [(v["metrics"][k], v.get("sample_size") or 0) for v in replies if k in v.get("metrics", {})]
                weight = sum(n for _, n in pairs)
                means.append(sum(m * n for m, n in pairs) / weight if weight else None)
            slowest = max((v.get("timings", {}).get("researcher_s") or 0.0 for v in replies), default=None)
            up = self.stats.get(r, {}).get("bytes_up")  # the updates' blobs: what a codec shrinks
            rows.append([r, f"{len(replies)}/{len(self.replies[r])}", samples, *means, slowest, up])
        return table(["round", "nodes ok", "samples", *keys, "slowest_node_s", "bytes_up"], rows, max_width=70)

    def metrics_frame(self) -> Any:
        """The per-node table as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("metrics_frame() needs pandas (`pip install pandas`); metrics_table() does not") from None
        records = [
            {
                "round": r,
                "node": node,
                "dropped": (v.get("dropped") or {}).get("reason"),
                "sample_size": v.get("sample_size"),
                **{f"metric_{k}": m for k, m in v.get("metrics", {}).items()},
                **{f"time_{k}": t for k, t in v.get("timings", {}).items()},
            }
            for r, nodes in sorted(self.replies.items())
            for node, v in sorted(nodes.items())
        ]
        return pd.DataFrame.from_records(records)
