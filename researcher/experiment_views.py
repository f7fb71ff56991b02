"""The read side of `Experiment`: Fed-BioMed-style getters of its settings and results.

Each `set_*` method of `Experiment` has a getter of the same name here (`exp.tags()`, `exp.round_limit()`):
    exp.set_round_limit(10)
    assert exp.round_limit() == 10
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsilo.common.plan_source import plan_hash
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import TorchTrainingPlan
from fedsilo.network.messages import DatasetInfo

from .aggregators import Aggregator
from .breakpoints import new_experiment_dir
from .monitor import Monitor
from .requests import Requests
from .rounds import AggregatedParams
from .strategies import Strategy


class ExperimentViews:
    """Getters mixed into `Experiment` (which holds the attributes they read)."""

    _tags: list[str] | None
    _nodes: list[str] | None
    _training_data: dict[str, DatasetInfo]
    _plan_class: type[TorchTrainingPlan] | None
    _plan_source: str | None
    _plan: TorchTrainingPlan | None
    _model_args: dict[str, Any]
    _training_args: TrainingArgs
    _round_limit: int | None
    _round_current: int
    _round_timeout: float | None
    _aggregator: Aggregator
    _strategy: Strategy
    _monitor: Monitor
    _save_breakpoints: bool
    _tensorboard: bool
    _root: Path
    _experiment_dir: Path | None
    _job_id: str

    def tags(self) -> list[str] | None:
        return None if self._tags is None else list(self._tags)

    def nodes(self) -> list[str] | None:
        return None if self._nodes is None else list(self._nodes)

    def training_data(self) -> dict[str, DatasetInfo]:
        """Node id -> the dataset it trains on."""
        return dict(self._training_data)

    def training_plan_class(self) -> type[TorchTrainingPlan] | None:
        return self._plan_class

    def training_plan_file(self) -> str | None:
        """The exact source shipped to the nodes."""
        return self._plan_source

    def training_plan_hash(self) -> str | None:
        return plan_hash(self._plan_source) if self._plan_source is not None else None

    def training_plan(self) -> TorchTrainingPlan | None:
        """The local plan instance; after rounds, it holds the latest global model."""
        return self._plan

    def model_args(self) -> dict[str, Any]:
        return dict(self._model_args)

    def training_args(self) -> TrainingArgs:
        return self._training_args.model_copy(deep=True)

    def round_limit(self) -> int | None:
        return self._round_limit

    def round_current(self) -> int:
        """Rounds completed so far."""
        return self._round_current

    def round_timeout(self) -> float:
        return self._round_timeout if self._round_timeout is not None else self._timeouts.round

    def aggregator(self) -> Aggregator:
        return self._aggregator

    def strategy(self) -> Strategy:
        return self._strategy

    node_selection_strategy = strategy

    def monitor(self) -> Monitor:
        return self._monitor

    def save_breakpoints(self) -> bool:
        return self._save_breakpoints

    def tensorboard(self) -> bool:
        return self._tensorboard

    def experimentation_folder(self) -> Path:
        return self._root

    def tensorboard_dir(self) -> Path | None:
        """The folder to give `tensorboard --logdir`; None while TensorBoard is off."""
        return self.experimentation_path() / "tensorboard" if self._tensorboard else None

    def experimentation_path(self) -> Path:
        """This experiment's own folder (`Experiment_NNNN`), created on first use."""
        if self._experiment_dir is None:
            self._experiment_dir = new_experiment_dir(self._root)
        return self._experiment_dir

    def job_id(self) -> str:
        return self._job_id

    def aggregated_params(self) -> AggregatedParams:
        """Round -> {"params": global parameters after that round}: a read-only Mapping.

        Only the latest round is held in memory; earlier rounds are read from
        `<experiment folder>/rounds/round_NNNN.safetensors` each time one is indexed."""
        return self._rounds.view()  # type: ignore[attr-defined]

    def training_replies(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Round -> node -> sample_size, timings, metrics, applied_caps, dropped (None or why)."""
        return {r: {n: dict(v) for n, v in nodes.items()} for r, nodes in self._history.replies.items()}  # type: ignore[attr-defined]

    def validation_metrics(self, key: str | None = None) -> dict[int, dict[str, Any]]:
        """Round -> {node name: its `global_*`/`test_*` metrics, "all nodes": the federation's (weighted by the
        nodes' test samples)}; with `key`, round -> {node name or "all nodes": that metric}:

            dice = exp.validation_metrics("test_dice")   # {0: {"hospital-a": 0.61, ..., "all nodes": 0.64}, ...}
        """
        return self._history.validation_metrics(key)  # type: ignore[attr-defined]

    def round_stats(self) -> dict[int, dict[str, float]]:
        """Round -> researcher-side seconds: `wall_s` (the whole round), `prepare_s` (parameters serialised
        and uploaded, requests built), `wait_s` (waiting for node messages and finished downloads), `handle_s` (the
        round's thread on replies and folds: small updates are downloaded there), `fetch_s` (the download threads'
        summed time: large updates are downloaded, parsed and checked while the round goes on), `aggregate_s`
        (the aggregator's result)."""
        return {r: dict(v) for r, v in self._history.stats.items()}  # type: ignore[attr-defined]

    def requests(self) -> Requests:
        """The connection (connected on first use): ping, list_datasets, search by hand."""
        return self._connect()  # type: ignore[attr-defined]
