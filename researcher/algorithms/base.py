"""The researcher side of a federated algorithm: what each node is sent, and how its replies are folded.

The round loop (`fedsilo.researcher.round`) drives one `FedAlgorithm` per experiment as a template:

    tasks = algorithm.configure_train(round_index, nodes, global_params)   # node -> NodeTask (blobs + config)
    algorithm.start_round(round_index, global_params)
    for update in replies_as_they_arrive:                                  # NodeUpdate, checked by the loop
        algorithm.add(update)
    global_params = algorithm.result()                                     # ends the round

Evaluation has the same shape: `configure_evaluate(round_index, nodes, global_params)` says which model each
node evaluates (the global model by default), and `aggregate_evaluate(results)` folds the nodes' metrics into
the federation's (the sample-weighted mean by default): for evaluation-only jobs (`Experiment.evaluate()`)
and for each training round's `global_*` / `test_*` metrics.

`state()` returns a JSON part and a tensor part (moments, control variates) that breakpoints save as
safetensors beside `breakpoint.json`; `load_state()` takes both back.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedsilo.common.algorithms import AlgorithmConfig, FedAvgConfig
from fedsilo.common.errors import ConfigError, FedsiloError

Params = dict[str, torch.Tensor]


class AggregationError(FedsiloError):
    """Updates could not be combined (nothing received, names or shapes differ, a blob is missing)."""


@dataclass
class NodeTask:
    """What one node is sent for a round: named blobs and the typed node-side configuration.

    `blobs` always holds "params" (the global model); SCAFFOLD adds "control" (the server's variate c).
    """

    blobs: dict[str, Params]
    config: AlgorithmConfig = field(default_factory=FedAvgConfig)


@dataclass
class NodeUpdate:
    """One node's reply as an algorithm sees it: downloaded, parsed, checked finite and compatible by the loop.

    `blobs` always holds "params" (the node's local model); SCAFFOLD adds "control_delta" (c_i+ - c_i).
    `sample_size` is the node's own count of its training split.

        NodeUpdate("hospital-a", {"params": local_model_state}, sample_size=120, metrics={"loss": 0.3})
    """

    node_id: str
    blobs: dict[str, Params]
    sample_size: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> Params:
        """The node's local model (blob "params")."""
        return self.blobs["params"]


@dataclass
class NodeEvaluation:
    """One node's evaluation of one model: the plan's `testing_step` metrics (sample-weighted over its test
    split) and `sample_size`, the node's own count of that split (the weight of its metrics).

        NodeEvaluation("hospital-a", sample_size=40, metrics={"accuracy": 0.9, "loss": 0.3})
    """

    node_id: str
    sample_size: int
    metrics: dict[str, float] = field(default_factory=dict)


def weighted_means(results: Iterable[NodeEvaluation]) -> dict[str, float]:
    """Per metric, the mean over every node that reported it, each weighted by its `sample_size`: the value
    the metric would have on the union of the nodes' test splits (for per-sample means such as accuracy and
    a mean loss). A metric reported only by nodes with no sample is left out (0/0 has no value)."""
    sums: dict[str, list[float]] = {}
    weights: dict[str, int] = {}
    for result in results:
        if result.sample_size <= 0:
            continue
        for key, value in result.metrics.items():
            if math.isfinite(value):
                sums.setdefault(key, []).append(float(value) * result.sample_size)
                weights[key] = weights.get(key, 0) + result.sample_size
    return {key: math.fsum(parts) / weights[key] for key, parts in sorted(sums.items())}


class FedAlgorithm(ABC):
    """Template: the round loop calls configure_train -> start_round -> add (per reply, as they arrive) -> result.

    A subclass sets `name`, implements the three aggregation steps and, if its node side is not plain local
    training, overrides `node_config` (and `configure_train` when it sends more than the global model).
    Settings are the constructor's keyword arguments, returned by `settings()`; `from_state` rebuilds an
    algorithm from a breakpoint with them.

        algo = FedAverage()                          # any subclass
        tasks = algo.configure_train(0, ["a", "b"], global_params)
        algo.start_round(0, global_params)
        algo.add(NodeUpdate("a", {"params": local_a}, sample_size=10))   # one per reply
        new_global = algo.result()
    """

    name: ClassVar[str] = ""
    reply_blobs: ClassVar[frozenset[str]] = frozenset({"params"})
    """The blob names a node's reply may carry: the round loop refuses others before downloading anything."""

    def node_config(self) -> AlgorithmConfig:
        """The typed configuration every node gets (plain local training by default)."""
        return FedAvgConfig()

    def configure_train(self, round_index: int, nodes: Sequence[str], global_params: Params) -> dict[str, NodeTask]:
        """Each node's task for this round: by default the global model and `node_config()` for all."""
        config = self.node_config()
        return {node: NodeTask(blobs={"params": global_params}, config=config) for node in nodes}

    def configure_evaluate(self, round_index: int, nodes: Sequence[str], global_params: Params) -> dict[str, NodeTask]:
        """Which model each node evaluates (`blobs["params"]`, the only blob an evaluation sends): by default
        the global model for all. `round_index` is the number of rounds done (the model after them)."""
        return {node: NodeTask(blobs={"params": global_params}) for node in nodes}

    def aggregate_evaluate(self, results: Sequence[NodeEvaluation]) -> dict[str, float]:
        """The federation's metrics from the nodes' (`weighted_means` by default: the sample-weighted mean)."""
        return weighted_means(results)

    @abstractmethod
    def start_round(self, round_index: int, global_params: Params) -> None:
        """Begin a round from `global_params` (the model the nodes were sent)."""

    @abstractmethod
    def add(self, update: NodeUpdate) -> None:
        """Fold one node's reply in; raise `AggregationError` on unusable input (the round goes on without it)."""

    @abstractmethod
    def result(self) -> Params:
        """The next global model. Ends the round and releases its buffers."""

    def aggregate(
        self,
        global_params: Params,
        updates: Mapping[str, tuple[Params, int]] | Iterable[NodeUpdate],
        round_index: int = 0,
    ) -> Params:
        """One whole round in one call: `{node: (params, sample_size)}` or `NodeUpdate`s, added in node order."""
        if isinstance(updates, Mapping):
            updates = [NodeUpdate(n, {"params": p}, w) for n, (p, w) in updates.items()]
        self.start_round(round_index, global_params)
        for update in sorted(updates, key=lambda u: u.node_id):
            self.add(update)
        return self.result()

    def check_blobs(self, update: NodeUpdate) -> None:
        """Refuse an update without "params" or with a blob this algorithm does not take (`reply_blobs`)."""
        if "params" not in update.blobs:
            raise AggregationError(f"node '{update.node_id}': no 'params' blob")
        unexpected = sorted(update.blobs.keys() - self.reply_blobs)[:5]
        if unexpected:
            raise AggregationError(f"node '{update.node_id}': unexpected blobs {unexpected} for {self.name}")

    def state(self) -> tuple[dict[str, Any], Params]:
        """What survives a breakpoint: a JSON-serialisable part and named tensors (saved as safetensors)."""
        return {}, {}

    def load_state(self, meta: dict[str, Any], tensors: Params) -> None:  # noqa: B027 (optional hook: stateless by default)
        """Restore what `state()` returned (settings come from the constructor; see `from_state`)."""

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments, JSON-serialisable (shown by `repr`, saved in breakpoints)."""
        return {}

    @classmethod
    def from_state(cls, settings: dict[str, Any], meta: dict[str, Any], tensors: Params) -> FedAlgorithm:
        """An algorithm built with `settings` (as `settings()` returned them) and its saved state loaded."""
        algorithm = cls(**settings)
        algorithm.load_state(meta, tensors)
        return algorithm

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def check_tensors(node_id: str, blob: str, tensors: Params, reference: Mapping[str, torch.Tensor]) -> None:
    """Refuse `tensors` unless they have exactly `reference`'s names and shapes (`AggregationError`).

    The round loop checks parameters already; this keeps an algorithm safe when driven directly (a notebook,
    a test, another loop) and covers extra blobs such as control variates. It reads shapes only (no data pass).
    """
    if tensors.keys() != reference.keys():
        missing = sorted(reference.keys() - tensors.keys())[:5]
        extra = sorted(tensors.keys() - reference.keys())[:5]
        raise AggregationError(f"node '{node_id}': {blob}: names differ (missing {missing}, unexpected {extra})")
    for k, ref in reference.items():
        if tensors[k].shape != ref.shape:
            shape, expected = tuple(tensors[k].shape), tuple(ref.shape)
            raise AggregationError(f"node '{node_id}': {blob}: '{k}' has shape {shape}, expected {expected}")


def check_setting(owner: object, key: str, value: object, valid: bool, expected: str) -> None:
    """Refuse a bad constructor argument with `ConfigError` naming the algorithm, the key and what is allowed."""
    if not valid:
        raise ConfigError(f"{type(owner).__name__}: {key} must be {expected}, got {value!r}")


def cast_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`value` (float64) in `reference`'s dtype: integer buffers (BatchNorm's batch count) are rounded, not cut."""
    if reference.is_floating_point():
        return value.to(reference.dtype)
    return value.round().to(reference.dtype)


Aggregator = FedAlgorithm
"""Fed-BioMed calls the researcher-side algorithm an Aggregator; both names are the same class."""
