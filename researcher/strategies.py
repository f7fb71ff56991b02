"""Node selection and the round policy: who trains, and what a round does with missing nodes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedsilo.common.errors import FedsiloError, RemoteError
from fedsilo.network.messages import DatasetInfo

DropKind = Literal["error", "timeout", "offline", "invalid"]


class RoundFailed(FedsiloError):
    """A round produced nothing to aggregate; the message says what happened to each node."""


@dataclass
class Drop:
    """A node left out of a round, and why (readable)."""

    node_id: str
    kind: DropKind
    reason: str
    error: RemoteError | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "reason": self.reason}
        if self.error is not None:
            out.update(code=self.error.code, stage=self.error.stage)
        return out


@dataclass
class RoundOutcome:
    round: int
    sampled: list[str]
    replied: list[str] = field(default_factory=list)
    dropped: dict[str, Drop] = field(default_factory=dict)


class Strategy:
    """Base class: `sample_nodes` before a round, `check_round` before aggregating it."""

    def sample_nodes(
        self, training_data: Mapping[str, DatasetInfo], round_index: int, online: Mapping[str, bool]
    ) -> tuple[list[str], dict[str, Drop]]:
        """Nodes to send the round to, and nodes left out up front (with the reason)."""
        raise NotImplementedError

    def check_round(self, outcome: RoundOutcome) -> None:
        """Raise when the round cannot be aggregated; otherwise record it."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state()` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DefaultStrategy(Strategy):
    """Every node with a dataset trains every round; nodes that fail, time out or go offline are
    dropped from that round and the round aggregates what arrived (at least `min_nodes` replies)."""

    def __init__(self, min_nodes: int = 1) -> None:
        if min_nodes < 1:
            raise ValueError("min_nodes must be at least 1")
        self.min_nodes = min_nodes
        self.history: list[dict[str, Any]] = []

    def sample_nodes(
        self, training_data: Mapping[str, DatasetInfo], round_index: int, online: Mapping[str, bool]
    ) -> tuple[list[str], dict[str, Drop]]:
        sampled, dropped = [], {}
        for node_id in sorted(training_data):
            # Unknown presence (never seen) still gets the request: the broker queues it for the node.
            if online.get(node_id) is False:
                dropped[node_id] = Drop(node_id, "offline", "offline when the round started")
            else:
                sampled.append(node_id)
        if not sampled:
            if not training_data:
                raise RoundFailed(f"round {round_index}: no training data: no node to send the round to")
            raise RoundFailed(
                f"round {round_index}: every node is offline ({', '.join(sorted(dropped))}); "
                "start their daemons (`fedsilo node start`) and run again"
            )
        return sampled, dropped

    def check_round(self, outcome: RoundOutcome) -> None:
        self.history.append(
            {
                "round": outcome.round,
                "sampled": list(outcome.sampled),
                "replied": list(outcome.replied),
                "dropped": {n: d.as_dict() for n, d in outcome.dropped.items()},
            }
        )
        if len(outcome.replied) >= self.min_nodes:
            return
        drops = [outcome.dropped[n] for n in sorted(outcome.dropped)]
        errors = [d.error for d in drops if d.error is not None]
        if drops and len(errors) == len(drops):
            first = errors[0]
            for other in errors[1:]:
                first.add_note(f"also {other}")
            raise first
        detail = "; ".join(f"{d.node_id}: {d.reason}" for d in drops) or "no node was sampled"
        got = f"only {len(outcome.replied)} of" if outcome.replied else "none of"
        raise RoundFailed(
            f"round {outcome.round}: {got} the {len(outcome.sampled)} sampled node(s) replied "
            f"(need {self.min_nodes}): {detail}"
        )

    def state(self) -> dict[str, Any]:
        return {"min_nodes": self.min_nodes, "history": self.history}

    def load_state(self, state: dict[str, Any]) -> None:
        self.min_nodes = int(state.get("min_nodes", self.min_nodes))
        self.history = list(state.get("history", []))

    def __repr__(self) -> str:
        return f"DefaultStrategy(min_nodes={self.min_nodes})"
