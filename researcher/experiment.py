"""`Experiment`: drive a federated training round by round from a notebook or a script."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedsilo.common.clitools import table
from fedsilo.common.config import Timeouts
from fedsilo.common.errors import ConfigError, PlanSourceError, SerializationError
from fedsilo.common.plan_source import load_plan_class, plan_source
from fedsilo.common.serialization import check_compatible
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import TorchTrainingPlan, TrainingPlanError
from fedsilo.network.credentials import Credentials
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.messages import (
    ApprovalReply,
    BlobRef,
    DatasetInfo,
    PlanStatusReply,
    new_id,
)

from .aggregators import Aggregator, FedAverage, Params
from .compression import Compression, compression_setting
from .evaluation import EvaluationJob, EvaluationReport, node_validation, round_evaluation
from .experiment_breakpoints import ExperimentBreakpoints
from .experiment_views import ExperimentViews
from .federation import find_training_data, no_data_message, statuses
from .history import History
from .monitor import Monitor
from .requests import Collected, Requests
from .round import RoundContext, TrainingRound
from .rounds import ROUNDS_DIR, RoundArchive
from .secagg import SecureAggregation
from .settings import (
    EXPERIMENTS_ENV,
    ExperimentError,
    absolute,
    instance,
    resolve_credentials,
    tags_list,
)
from .strategies import DefaultStrategy, Strategy

log = logging.getLogger(__name__)



class Experiment(ExperimentViews, ExperimentBreakpoints):
    """A federated training: which data (tags), which code (training plan), how (args, aggregator).

    Every argument can be changed between rounds with its `set_*` method and read back with the
    method of the same name (`experiment_views.py`). Rounds run synchronously; Ctrl-C cancels the
    current round and leaves the experiment as it was before that round. Breakpoints:
    `experiment_breakpoints.py`.

        exp = Experiment(tags=["diabetes"], training_plan_class=MyPlan, model_args={"in_features": 16},
                         training_args={"epochs": 1}, round_limit=5, aggregator=FedProx(mu=0.01),
                         network="run/quickstart/network")
        exp.training_plan_approve()     # each node's data manager reviews the plan's sha256
        exp.run()
        print(exp.metrics_table(per="round"))
    """

    def __init__(
        self,
        tags: str | list[str] | None = None,
        nodes: list[str] | None = None,
        training_plan_class: type[TorchTrainingPlan] | None = None,
        model_args: dict[str, Any] | None = None,
        training_args: TrainingArgs | dict[str, Any] | None = None,
        round_limit: int | None = None,
        aggregator: Aggregator | type[Aggregator] | None = None,
        node_selection_strategy: Strategy | type[Strategy] | None = None,
        tensorboard: bool = False,
        save_breakpoints: bool = False,
        experimentation_folder: str | Path | None = None,
        network: str | Path | Credentials | None = None,
        round_timeout: float | None = None,
        training_data: Mapping[str, DatasetInfo | dict[str, Any]] | None = None,
        secure_aggregation: bool | SecureAggregation = False, compression: str | Compression | None = None,
    ) -> None:
        self._credentials = resolve_credentials(network)
        self._timeouts = Timeouts()
        self._requests: Requests | None = None
        self._filestore: FileStoreClient | None = None
        self._job_id = f"{self._credentials.party}-{new_id()[:12]}"
        self._tags: list[str] | None = None
        self._nodes: list[str] | None = list(nodes) if nodes is not None else None
        self._training_data: dict[str, DatasetInfo] = {}
        self._plan_class: type[TorchTrainingPlan] | None = None
        self._plan_source: str | None = None
        self._plan_name_value = ""
        self._plan: TorchTrainingPlan | None = None
        self._plan_ref: BlobRef | None = None
        self._model_args: dict[str, Any] = dict(model_args or {})
        self._training_args = TrainingArgs.parse(training_args)
        self._round_limit: int | None = None
        self._round_current = 0
        self._aggregator: Aggregator = FedAverage()
        self._strategy: Strategy = DefaultStrategy()
        self._round_timeout: float | None = None
        self._global_params: Params | None = None
        self._rounds = RoundArchive()  # the current global model in memory, earlier rounds on disk
        self._history = History()
        self._root = absolute(experimentation_folder or os.environ.get(EXPERIMENTS_ENV) or "experiments")
        self._experiment_dir: Path | None = None
        self._save_breakpoints = bool(save_breakpoints)
        self._tensorboard = False
        self._monitor = Monitor()

        self.set_round_limit(round_limit)
        self.set_round_timeout(round_timeout)
        if aggregator is not None:
            self.set_aggregator(aggregator)
        if node_selection_strategy is not None:
            self.set_strategy(node_selection_strategy)
        self.set_tensorboard(tensorboard)
        self._secagg = SecureAggregation.of(secure_aggregation, self._aggregator)  # the researcher sees sums only
        self._compression = compression_setting(compression, self._secagg)  # the nodes' update codec
        if training_plan_class is not None:
            self.set_training_plan_class(training_plan_class)
        if training_data is not None:
            self.set_training_data(training_data)
            self._tags = tags_list(tags)
        elif tags is not None:
            self.set_tags(tags)

    # ================================================================== setters
    def set_tags(self, tags: str | list[str] | None) -> list[str] | None:
        """Set the dataset tags and search the online nodes for matching datasets."""
        self._tags = tags_list(tags)
        self._training_data = {}
        if self._tags is not None:
            self._search()
        return self.tags()

    def set_nodes(self, nodes: list[str] | None) -> list[str] | None:
        """Restrict training to these node ids (None: every node that has the data)."""
        self._nodes = list(nodes) if nodes is not None else None
        if self._nodes is not None:
            self._training_data = {n: d for n, d in self._training_data.items() if n in self._nodes}
        if not self._training_data and self._tags is not None:
            self._search()
        return self.nodes()

    def set_training_data(self, training_data: Mapping[str, DatasetInfo | dict[str, Any]]) -> dict[str, DatasetInfo]:
        """Node id -> dataset metadata (as a search returns it), bypassing the tag search."""
        self._training_data = {
            str(n): d if isinstance(d, DatasetInfo) else DatasetInfo.model_validate(d) for n, d in training_data.items()
        }
        return self.training_data()

    def set_training_plan_class(self, training_plan_class: type[TorchTrainingPlan]) -> type[TorchTrainingPlan]:
        """Extract the plan's source (what nodes will run) and build the local instance from it."""
        if not (isinstance(training_plan_class, type) and issubclass(training_plan_class, TorchTrainingPlan)):
            raise PlanSourceError(
                f"training_plan_class must be a subclass of TorchTrainingPlan, got {training_plan_class!r}"
            )
        source = plan_source(training_plan_class)
        self._use_plan_source(source, training_plan_class.__name__)
        self._plan_class = training_plan_class
        return training_plan_class

    def set_model_args(self, model_args: dict[str, Any]) -> dict[str, Any]:
        self._model_args = dict(model_args)
        if self._plan_source is not None:
            self._build_plan()
        return self.model_args()

    def set_training_args(self, training_args: TrainingArgs | dict[str, Any]) -> TrainingArgs:
        """Validated now; sent with every following round (data, not code: no new approval)."""
        self._training_args = TrainingArgs.parse(training_args)
        return self.training_args()

    def set_round_limit(self, round_limit: int | None) -> int | None:
        if round_limit is not None:
            if not isinstance(round_limit, int) or round_limit < 0:
                raise ConfigError(f"round_limit must be a non-negative integer or None, got {round_limit!r}")
            if round_limit < self._round_current:
                raise ConfigError(f"round_limit {round_limit} is below the {self._round_current} rounds already run")
        self._round_limit = round_limit
        return round_limit

    def set_round_timeout(self, round_timeout: float | None) -> float:
        if round_timeout is not None and not round_timeout > 0:
            raise ConfigError(f"round_timeout must be > 0 seconds, got {round_timeout!r}")
        self._round_timeout = float(round_timeout) if round_timeout is not None else None
        return self.round_timeout()

    def set_aggregator(self, aggregator: Aggregator | type[Aggregator]) -> Aggregator:
        self._aggregator = instance(aggregator, Aggregator, "aggregator")
        return self._aggregator

    def set_strategy(self, node_selection_strategy: Strategy | type[Strategy]) -> Strategy:
        self._strategy = instance(node_selection_strategy, Strategy, "node_selection_strategy")
        return self._strategy

    set_node_selection_strategy = set_strategy

    def set_tensorboard(self, tensorboard: bool) -> bool:
        """Write node scalars under `<experiment folder>/tensorboard/<node>` (kept across resumes)."""
        self._tensorboard = bool(tensorboard)
        self._monitor.set_tensorboard_dir(self.tensorboard_dir())
        return self._tensorboard

    def set_save_breakpoints(self, save_breakpoints: bool) -> bool:
        self._save_breakpoints = bool(save_breakpoints)
        return self._save_breakpoints

    def set_experimentation_folder(self, folder: str | Path) -> Path:
        """Root under which `Experiment_NNNN` folders are made; takes effect for a new experiment folder."""
        self._root = absolute(folder)
        self._experiment_dir = None
        if self._tensorboard:
            self.set_tensorboard(True)
        return self._root

    # ================================================================== actions
    def run(self, rounds: int | None = None, increase: bool = False) -> int:
        """Run `rounds` rounds (default: up to `round_limit`); returns how many ran.

        With a limit, `rounds` is cut to fit unless `increase=True`, which raises the limit.
        """
        if rounds is None:
            if self._round_limit is None:
                raise ExperimentError("no round limit: call run(rounds=N) or set_round_limit(N)")
            rounds = self._round_limit - self._round_current
        elif rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {rounds}")
        elif self._round_limit is not None and self._round_current + rounds > self._round_limit:
            if increase:
                self._round_limit = self._round_current + rounds
            else:
                rounds = self._round_limit - self._round_current
                log.warning("round_limit %d: running %d round(s) only", self._round_limit, max(rounds, 0))
        if rounds <= 0:
            log.warning("round_limit %s reached; use run(rounds, increase=True) to go on", self._round_limit)
            return 0
        self._check_ready()
        with tqdm(total=rounds, desc="rounds", unit="round", disable=None, dynamic_ncols=True) as bar:
            for _ in range(rounds):
                self._run_round(bar)
                bar.update(1)
        return rounds

    def run_once(self, increase: bool = False) -> int:
        """Run one round; returns 1, or 0 when `round_limit` is reached and `increase` is False."""
        if self._round_limit is not None and self._round_current >= self._round_limit:
            if not increase:
                log.warning("round_limit %d reached; use run_once(increase=True) to go on", self._round_limit)
                return 0
            self._round_limit = self._round_current + 1
        self._check_ready()
        with tqdm(total=1, desc="round", unit="round", disable=None, dynamic_ncols=True) as bar:
            self._run_round(bar)
            bar.update(1)
        return 1

    def evaluate(self) -> EvaluationReport:
        """Test the current global model on every node of the experiment (its test split, or its whole
        dataset when `test_ratio` is 0) with the plan's `testing_step`: no training, no update leaves a node.
        Returns node -> metrics and the federation's (`aggregate_evaluate`: the sample-weighted mean);
        kept in the history and TensorBoard (`EVALUATION/<name>`) under the rounds done. `evaluation.py`."""
        self._check_ready()
        report = EvaluationJob(self._round_context(), self._round_current).run()
        self._history.evaluations[report.round] = report.as_dict()
        self._monitor.round_scalars("EVALUATION", report.metrics, {n: e.metrics for n, e in report.nodes.items()},
                                    report.round)  # fmt: skip
        return report

    def training_plan_approve(self, description: str = "") -> dict[str, str]:
        """Send the plan to each node for review; node -> status there (pending, approved, rejected)."""
        self._require_plan()
        nodes = self._target_nodes()
        got = self._connect().submit_plan(nodes, self._upload_plan(), self._plan_name(), description)
        status = self._statuses(got, ApprovalReply)
        log.info("plan %s submitted for approval: %s", self.training_plan_hash(), status)
        return status

    def check_training_plan_status(self) -> dict[str, str]:
        """node -> approved | pending | rejected | unknown ("not required" when the node needs no approval)."""
        self._require_plan()
        got = self._connect().plan_status(self._target_nodes(), self.training_plan_hash() or "")
        return self._statuses(got, PlanStatusReply)

    def info(self) -> dict[str, Any]:
        """Print the experiment's settings and what is still missing before it can run; returns them."""
        fields: dict[str, Any] = {
            "tags": self._tags,
            "nodes": self._nodes if self._nodes is not None else "(all)",
            "training data": ", ".join(f"{n}:{d.name}" for n, d in sorted(self._training_data.items())) or None,
            "training plan": self._plan_name() if self._plan_source else None,
            "plan sha256": self.training_plan_hash(),
            "model args": self._model_args,
            "training args": self._training_args.model_dump(exclude_defaults=True),
            "aggregator": repr(self._aggregator),
            "strategy": repr(self._strategy),
            "rounds done": self._round_current,
            "round limit": self._round_limit,
            "round timeout (s)": self.round_timeout(),
            "tensorboard": self._tensorboard,
            "save breakpoints": self._save_breakpoints,
            "experiment folder": self._experiment_dir or self._root,
            "job id": self._job_id,
        }
        missing = self._missing()
        text = table(["setting", "value"], [[k, v] for k, v in fields.items()], max_width=90)
        text += "\n\n" + ("missing: " + "; ".join(missing) if missing else "ready to run")
        print(text)
        return {**fields, "missing": missing}

    def metrics_table(self, metrics: Sequence[str] | None = None, per: str = "node") -> str:
        """Metrics as a text table: per round and node (status, samples, metrics, node and researcher
        timings); `per="round"`: a line a round, sample-weighted means; `per="validation"`: nodes and federation.
        `metrics` picks and orders the metric columns (default: all, loss first)."""
        return self._history.metrics_table(metrics, per)

    def metrics_frame(self) -> Any:
        """The metrics table as a pandas DataFrame (needs pandas)."""
        return self._history.metrics_frame()

    def close(self) -> None:
        """Disconnect and flush TensorBoard files; the experiment's state stays readable."""
        self._monitor.close()
        self._rounds.close()
        if self._requests is not None:
            self._requests.close()
            self._requests = None

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self._plan_name() if self._plan_source else None
        rounds = f"{self._round_current}/{self._round_limit}"
        return f"<Experiment {self._job_id} plan={name} tags={self._tags} rounds={rounds}>"

    # ================================================================== one round
    def _round_context(self) -> RoundContext:
        assert self._plan_source is not None and self._global_params is not None
        return RoundContext(
            job_id=self._job_id,
            requests=self._connect(),
            files=self._fs(),
            algorithm=self._aggregator,
            strategy=self._strategy,
            training_data=self._training_data,
            plan=self._upload_plan(),
            plan_name=self._plan_name(),
            model_args=self._model_args,
            training_args=self._training_args,
            global_params=self._global_params,
            timeout=self.round_timeout(),
            monitor=self._monitor,
            name_of=self._name,
            readers=self._target_nodes(),
            secagg=self._secagg, compression=self._compression,
        )

    def _run_round(self, bar: tqdm) -> None:
        try:
            record, new_params = TrainingRound(self._round_context(), self._round_current, bar).run()
        except KeyboardInterrupt:
            self._monitor.discard_round()
            log.warning("round %d cancelled: the experiment is as it was before it; run again to redo it",
                        self._round_current)  # fmt: skip
            raise
        except BaseException:
            self._monitor.discard_round()
            raise
        self._set_global(new_params)
        self._rounds.put(record.index, self._global_params or {}, self._rounds.folder or self._rounds_dir())
        self._history.add(record, round_evaluation(record, self._aggregator))
        self._monitor.round_scalars("ROUND", self._history.round_metrics[record.index], node_validation(record),
                                    record.index)  # fmt: skip
        self._round_current += 1
        self._monitor.end_round()
        if self._save_breakpoints:
            self.breakpoint()
        ok = sum(1 for r in record.nodes.values() if r.dropped is None)
        postfix = {"nodes": f"{ok}/{len(record.nodes)}"}
        loss = self._history.mean_loss(record.index)
        if loss is not None:
            postfix["loss"] = f"{loss:.4g}"
        bar.set_postfix(postfix, refresh=False)

    # ================================================================== helpers
    def _connect(self) -> Requests:
        if self._requests is None:
            req = Requests(self._credentials, self._timeouts, on_log=self._monitor.on_log)
            req.start()
            self._requests = req
        return self._requests

    def _fs(self) -> FileStoreClient:
        if self._filestore is None:
            self._filestore = FileStoreClient(self._credentials.filestore, self._timeouts)
        return self._filestore

    def _search(self) -> None:
        assert self._tags is not None
        self._training_data = find_training_data(self._connect(), self._tags, self._nodes, self._name)

    def _use_plan_source(self, source: str, name: str) -> None:
        self._plan_source = source
        self._plan_name_value = name
        self._plan_ref = None
        self._build_plan()

    def _build_plan(self) -> None:
        """Instantiate the plan from the shipped source itself: the local model is what nodes run."""
        assert self._plan_source is not None
        cls = load_plan_class(self._plan_source, self._plan_name())
        try:
            plan = cls()
            plan.post_init(self._model_args, self._training_args)
            fresh = plan.shared_parameters()  # the global model: personalised layers stay on the nodes
        except (TrainingPlanError, PlanSourceError):
            raise
        except Exception as exc:
            raise PlanSourceError(
                f"building {self._plan_name()} locally failed ({type(exc).__name__}: {exc}); "
                "check model_args and the plan's init_model"
            ) from exc
        self._plan = plan
        if self._global_params is not None:
            try:
                check_compatible(self._global_params, fresh)
                plan.set_parameters(self._global_params)
                return
            except SerializationError as exc:
                log.warning("the model changed shape (%s): starting again from fresh parameters", exc)
        self._set_global(fresh)

    def _set_global(self, params: Params) -> None:
        self._global_params = {k: v.detach().cpu() for k, v in params.items()}
        if self._plan is not None:
            self._plan.set_parameters(self._global_params)

    def _upload_plan(self) -> BlobRef:
        if self._plan_ref is None:
            source = self._plan_source.encode("utf-8")  # type: ignore[union-attr] # set with the plan; named by its sha256
            self._plan_ref = self._fs().upload_bytes(source, readers=self._target_nodes(), digest="sha256")
        return self._fs().ensure_readers(self._plan_ref, self._target_nodes())  # the store lets only these read it

    def _plan_name(self) -> str:
        return self._plan_name_value

    def _rounds_dir(self) -> Path:
        return self.experimentation_path() / ROUNDS_DIR

    def _name(self, node: str) -> str:
        return self._requests.node_name(node) if self._requests is not None else node

    def _missing(self) -> list[str]:
        missing = []
        if self._plan_source is None:
            missing.append("a training plan (set_training_plan_class)")
        if not self._training_data:
            missing.append("training data (set_tags with tags that some node holds, or set_training_data)")
        return missing

    def _check_ready(self) -> None:
        if self._plan_source is None:
            raise ExperimentError("no training plan: pass training_plan_class= or call set_training_plan_class()")
        if not self._training_data:
            if self._tags is None:
                raise ExperimentError("no training data: pass tags= or call set_tags() / set_training_data()")
            self._search()  # nodes may have come online since the last search
            if not self._training_data:
                online = self._connect().online_nodes(wait=False)
                raise ExperimentError(no_data_message(self._tags, len(online), online))

    def _require_plan(self) -> None:
        if self._plan_source is None:
            raise ExperimentError("no training plan: pass training_plan_class= or call set_training_plan_class()")

    def _target_nodes(self) -> list[str]:
        if self._training_data:
            return sorted(self._training_data)
        if self._nodes is not None:
            return list(self._nodes)
        nodes = self._connect().online_nodes()
        if not nodes:
            raise ExperimentError("no node is online and no training data is set")
        return nodes

    def _statuses(self, got: Collected, kind: type) -> dict[str, str]:
        return statuses(got, kind, self._timeouts.request)
