"""Aggregators: fold node updates into the next global model as the replies arrive."""

from __future__ import annotations

from typing import Any

import torch

from fedsilo.common.errors import FedsiloError

Params = dict[str, torch.Tensor]


class AggregationError(FedsiloError):
    """Updates could not be combined (nothing received, or shapes differ)."""


class Aggregator:
    """Base class. A round is `start_round(global)`, one `add(node, params, weight)` per reply, `result()`.

    Subclasses keep their own running state so that updates need not all be held in memory.
    """

    def start_round(self, global_params: Params) -> None:
        raise NotImplementedError

    def add(self, node_id: str, params: Params, weight: int) -> None:
        raise NotImplementedError

    def result(self) -> Params:
        raise NotImplementedError

    def aggregate(self, global_params: Params, updates: dict[str, tuple[Params, int]]) -> Params:
        """Aggregate a complete set of `{node: (params, weight)}` in one call."""
        self.start_round(global_params)
        for node_id in sorted(updates):
            params, weight = updates[node_id]
            self.add(node_id, params, weight)
        return self.result()

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state kept in breakpoints (tensors do not belong here)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state()` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedAverage(Aggregator):
    """Federated averaging: the mean of node parameters weighted by their sample sizes.

    Accumulates in float64 so that the result does not depend on the order of the replies beyond
    rounding; when every weight is zero the nodes count equally.
    """

    def __init__(self) -> None:
        self._reference: Params = {}
        self._weighted: dict[str, torch.Tensor] = {}
        self._plain: dict[str, torch.Tensor] = {}
        self._total_weight = 0
        self._count = 0
        self._nodes: list[str] = []
        self._started = False

    def start_round(self, global_params: Params) -> None:
        self._reference = global_params
        self._weighted = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_params.items()}
        self._plain = {}  # the unweighted sum, needed only when every weight is zero: made on the first such update
        self._total_weight = 0
        self._count = 0
        self._nodes = []
        self._started = True

    def add(self, node_id: str, params: Params, weight: int) -> None:
        if not self._started:
            raise AggregationError("start_round must be called before add")
        if weight < 0:
            raise AggregationError(f"node '{node_id}': negative weight {weight}")
        if node_id in self._nodes:
            raise AggregationError(f"node '{node_id}' already contributed to this round")
        if params.keys() != self._weighted.keys():
            missing = sorted(self._weighted.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self._weighted.keys())[:5]
            raise AggregationError(f"node '{node_id}': parameter names differ (missing {missing}, unexpected {extra})")
        for k, acc in self._weighted.items():
            value = params[k].detach().to(device="cpu", dtype=torch.float64)
            if value.shape != acc.shape:
                raise AggregationError(
                    f"node '{node_id}': parameter '{k}' has shape {tuple(value.shape)}, expected {tuple(acc.shape)}"
                )
            acc.add_(value, alpha=float(weight))
            if weight == 0:
                if k not in self._plain:
                    self._plain[k] = torch.zeros(acc.shape, dtype=torch.float64)
                self._plain[k].add_(value)
        self._total_weight += weight
        self._count += 1
        self._nodes.append(node_id)

    def result(self) -> Params:
        """The round's global model. Ends the round: the running sums are released, not kept until the next
        round (with 10M parameters they are 77 MiB of float64, plus a reference to the previous model)."""
        if not self._started:
            raise AggregationError("start_round must be called before result")
        if self._count == 0:
            raise AggregationError("no node update to aggregate")
        if self._total_weight > 0:
            sums, denominator = self._weighted, float(self._total_weight)
        else:
            sums, denominator = self._plain, float(self._count)
        out: Params = {}
        for k, acc in sums.items():
            mean = acc / denominator
            ref = self._reference[k]
            out[k] = mean.round().to(ref.dtype) if not ref.is_floating_point() else mean.to(ref.dtype)
        self._reference, self._weighted, self._plain = {}, {}, {}
        self._started = False
        return out

    @property
    def contributors(self) -> list[str]:
        """Nodes added in the current round, in arrival order."""
        return list(self._nodes)
