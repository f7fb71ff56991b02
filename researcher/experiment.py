"""`Experiment`: drive a federated training round by round from a notebook or a script."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedsilo.common.clitools import table
from fedsilo.common.config import Timeouts
from fedsilo.common.errors import ConfigError, FedsiloError, PlanSourceError, SerializationError, TransferError
from fedsilo.common.plan_source import load_plan_class, plan_hash, plan_source
from fedsilo.common.serialization import check_compatible, params_from_bytes, params_to_bytes
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import TorchTrainingPlan, TrainingPlanError
from fedsilo.network.credentials import Credentials
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.messages import (
    ApprovalReply,
    BlobRef,
    DatasetInfo,
    ErrorReply,
    Message,
    PlanStatusReply,
    Presence,
    ScalarMessage,
    TaskAck,
    TrainReply,
    TrainRequest,
    new_id,
)

from .aggregators import AggregationError, Aggregator, FedAverage, Params
from .breakpoints import new_experiment_dir, read_breakpoint, save_breakpoint
from .monitor import Monitor
from .requests import Requests, remote_error
from .rounds import ROUNDS_DIR, AggregatedParams, RoundArchive
from .strategies import DefaultStrategy, Drop, RoundOutcome, Strategy
from .update_checks import InvalidUpdate, check_params, check_reply

log = logging.getLogger(__name__)

NETWORK_ENV = "FEDSILO_NETWORK"
EXPERIMENTS_ENV = "FEDSILO_EXPERIMENTS"


class ExperimentError(FedsiloError):
    """The experiment is not ready for what was asked (missing plan, no training data, ...)."""


class Experiment:
    """A federated training: which data (tags), which code (training plan), how (args, aggregator).

    Every argument can be changed between rounds with its `set_*` method and read back with the
    method of the same name. Rounds run synchronously; Ctrl-C cancels the current round and leaves
    the experiment as it was before that round.
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
    ) -> None:
        self._credentials = _resolve_credentials(network)
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
        self._params_ref: BlobRef | None = None
        self._rounds = RoundArchive()  # the current global model in memory, earlier rounds on disk
        self._replies: dict[int, dict[str, dict[str, Any]]] = {}
        self._round_stats: dict[int, dict[str, float]] = {}
        self._root = _absolute(experimentation_folder or os.environ.get(EXPERIMENTS_ENV) or "experiments")
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
        if training_plan_class is not None:
            self.set_training_plan_class(training_plan_class)
        if training_data is not None:
            self.set_training_data(training_data)
            self._tags = _tags_list(tags)
        elif tags is not None:
            self.set_tags(tags)

    # ================================================================== getters
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
        return self._rounds.view()

    def training_replies(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Round -> node -> sample_size, timings, metrics, applied_caps, dropped (None or why)."""
        return {r: {n: dict(v) for n, v in nodes.items()} for r, nodes in self._replies.items()}

    def round_stats(self) -> dict[int, dict[str, float]]:
        """Round -> researcher-side seconds: `wall_s` (the whole round), `prepare_s` (parameters serialised
        and uploaded, requests built), `wait_s` (waiting for node messages), `handle_s` (replies downloaded,
        checked and added to the aggregator), `aggregate_s` (the aggregator's result)."""
        return {r: dict(v) for r, v in self._round_stats.items()}

    def requests(self) -> Requests:
        """The connection (connected on first use): ping, list_datasets, search by hand."""
        return self._connect()

    # ================================================================== setters
    def set_tags(self, tags: str | list[str] | None) -> list[str] | None:
        """Set the dataset tags and search the online nodes for matching datasets."""
        self._tags = _tags_list(tags)
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
        self._aggregator = _instance(aggregator, Aggregator, "aggregator")
        return self._aggregator

    def set_strategy(self, node_selection_strategy: Strategy | type[Strategy]) -> Strategy:
        self._strategy = _instance(node_selection_strategy, Strategy, "node_selection_strategy")
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
        self._root = _absolute(folder)
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

    def breakpoint(self) -> Path:
        """Save the state after the last completed round; returns the breakpoint folder."""
        self._require_plan()
        if self._global_params is None or self._plan_source is None:
            raise ExperimentError("nothing to save: the training plan is not built")
        state = {
            "job_id": self._job_id,
            "round_current": self._round_current,
            "round_limit": self._round_limit,
            "round_timeout": self._round_timeout,
            "tags": self._tags,
            "nodes": self._nodes,
            "training_data": {n: d.model_dump(mode="json") for n, d in sorted(self._training_data.items())},
            "training_plan_class": self._plan_name(),
            "model_args": self._model_args,
            "training_args": self._training_args.model_dump(mode="json"),
            "aggregator": {"class": _class_path(self._aggregator), "state": self._aggregator.state()},
            "strategy": {"class": _class_path(self._strategy), "state": self._strategy.state()},
            "tensorboard": self._tensorboard,
            "save_breakpoints": self._save_breakpoints,
            "experimentation_folder": str(self._root),
            "training_replies": {str(r): v for r, v in self._replies.items()},
            "round_stats": {str(r): v for r, v in self._round_stats.items()},
            "monitor": self._monitor.state(),
            "round_sha256": {str(r): h for r, h in sorted(self._rounds.hashes().items())},
        }
        folder = save_breakpoint(
            self.experimentation_path(), self._round_current, state, self._global_params, self._plan_source
        )
        log.info("breakpoint saved: %s", folder)
        return folder

    @classmethod
    def load_breakpoint(
        cls,
        path: str | Path | None = None,
        *,
        network: str | Path | Credentials | None = None,
        aggregator: Aggregator | None = None,
        node_selection_strategy: Strategy | None = None,
    ) -> Experiment:
        """Resume from a breakpoint folder, an experiment folder or a root (default: the latest one).

        The plan is rebuilt from the saved source, so its hash (and the nodes' approval) is unchanged.
        An aggregator or strategy defined in a notebook cannot be re-imported: pass it again here.
        """
        if path is None:
            path = Path(os.environ.get(EXPERIMENTS_ENV) or "experiments")
        folder, state, params, source = read_breakpoint(path)
        exp = cls(
            network=network,
            model_args=state["model_args"],
            training_args=state["training_args"],
            round_timeout=state.get("round_timeout"),
            experimentation_folder=folder.parent.parent,
            save_breakpoints=state.get("save_breakpoints", True),
            training_data=state["training_data"],
            tags=state.get("tags"),
            nodes=state.get("nodes"),
        )
        exp._experiment_dir = folder.parent
        exp._job_id = state["job_id"]
        exp._use_plan_source(source, state["training_plan_class"])
        check_compatible(params, exp._global_params or {})
        exp._set_global(params)
        exp._round_current = int(state["round_current"])
        exp.set_round_limit(state.get("round_limit"))
        exp._aggregator = aggregator or _restore(state["aggregator"], Aggregator, "aggregator")
        exp._strategy = node_selection_strategy or _restore(state["strategy"], Strategy, "node_selection_strategy")
        if aggregator is None:
            exp._aggregator.load_state(state["aggregator"].get("state", {}))
        if node_selection_strategy is None:
            exp._strategy.load_state(state["strategy"].get("state", {}))
        exp._replies = {int(r): v for r, v in state.get("training_replies", {}).items()}
        exp._round_stats = {int(r): v for r, v in state.get("round_stats", {}).items()}
        if exp._round_current > 0:
            hashes = {int(r): h for r, h in state.get("round_sha256", {}).items()}
            current = (exp._round_current - 1, exp._global_params or {})
            exp._rounds = RoundArchive(folder.parent / ROUNDS_DIR, current, hashes)
        exp.set_tensorboard(bool(state.get("tensorboard")))
        exp._monitor.load_state(state.get("monitor", {}))
        log.info("resumed %s after round %d", folder, exp._round_current)
        return exp

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
        timings), or with `per="round"` one line a round with sample-weighted means over the nodes.
        `metrics` picks and orders the metric columns (default: all, loss first)."""
        if per not in ("node", "round"):
            raise ValueError("per must be 'node' or 'round'")
        keys = list(metrics) if metrics is not None else self._metric_keys()
        if per == "round":
            return self._round_table(keys)
        headers = ["round", "node", "status", "samples", *keys, "node_total_s", "researcher_s"]
        rows = []
        for r in sorted(self._replies):
            for node, v in sorted(self._replies[r].items()):
                dropped = v.get("dropped")
                status = f"dropped: {dropped['reason']}" if dropped else "ok"
                values = v.get("metrics", {})
                rows.append(
                    [
                        r,
                        v.get("node_name") or node,
                        status,
                        v.get("sample_size"),
                        *[values.get(k) for k in keys],
                        v.get("timings", {}).get("total_s"),
                        v.get("timings", {}).get("researcher_s"),
                    ]
                )
        return table(headers, rows, max_width=70)

    def _metric_keys(self) -> list[str]:
        keys = sorted({k for nodes in self._replies.values() for v in nodes.values() for k in v.get("metrics", {})})
        return ["loss", *[k for k in keys if k != "loss"]] if "loss" in keys else keys

    def _round_table(self, keys: list[str]) -> str:
        rows = []
        for r in sorted(self._replies):
            replies = [v for v in self._replies[r].values() if not v.get("dropped")]
            samples = sum(v.get("sample_size") or 0 for v in replies)
            means = []
            for k in keys:
                pairs = [(v["metrics"][k], v.get("sample_size") or 0) for v in replies if k in v.get("metrics", {})]
                weight = sum(n for _, n in pairs)
                means.append(sum(m * n for m, n in pairs) / weight if weight else None)
            slowest = max((v.get("timings", {}).get("researcher_s") or 0.0 for v in replies), default=None)
            rows.append([r, f"{len(replies)}/{len(self._replies[r])}", samples, *means, slowest])
        return table(["round", "nodes ok", "samples", *keys, "slowest_node_s"], rows, max_width=70)

    def metrics_frame(self) -> Any:
        """The metrics table as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("metrics_frame() needs pandas (`pip install pandas`); metrics_table() does not") from None
        records = []
        for r, nodes in sorted(self._replies.items()):
            for node, v in sorted(nodes.items()):
                records.append(
                    {
                        "round": r,
                        "node": node,
                        "dropped": (v.get("dropped") or {}).get("reason"),
                        "sample_size": v.get("sample_size"),
                        **{f"metric_{k}": m for k, m in v.get("metrics", {}).items()},
                        **{f"time_{k}": t for k, t in v.get("timings", {}).items()},
                    }
                )
        return pd.DataFrame.from_records(records)

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
    def _run_round(self, bar: tqdm) -> None:
        round_index = self._round_current
        t_start = time.perf_counter()
        req = self._connect()
        assert self._plan_source is not None and self._global_params is not None
        plan_ref = self._upload_plan()
        params_ref = self._upload_params()
        online = {n: s.online for n, s in req.nodes().items()}
        sampled, dropped = self._strategy.sample_nodes(self._training_data, round_index, online)
        outcome = RoundOutcome(round_index, list(sampled), [], dict(dropped))
        args = self._training_args
        outgoing = {
            node: TrainRequest(
                sender=req.party,
                job_id=self._job_id,
                round=round_index,
                dataset_id=self._training_data[node].dataset_id,
                plan=plan_ref,
                plan_name=self._plan_name(),
                blobs={"params": params_ref},
                training_args=args,
                model_args=self._model_args,
            )
            for node in sampled
        }
        node_of = {msg.request_id: node for node, msg in outgoing.items()}
        results: dict[str, dict[str, Any]] = {}
        max_bytes = 2 * params_ref.size + (1 << 16)
        timeout = self.round_timeout()
        self._aggregator.start_round(self._global_params)
        bar.set_description(f"round {round_index}")
        prepare_s = time.perf_counter() - t_start
        wait_s = 0.0
        handle_s = 0.0
        try:
            with req.waiter(node_of, job_id=self._job_id, watch_presence=True) as waiter:
                sent_at = time.perf_counter()
                for node, msg in outgoing.items():
                    req.send(waiter, node, msg)  # re-sent until the node answers
                pending = set(sampled)
                deadline = time.monotonic() + timeout
                while pending:
                    t_wait = time.perf_counter()
                    msg = waiter.get(deadline)
                    t_got = time.perf_counter()
                    wait_s += t_got - t_wait
                    if msg is None:
                        break
                    self._on_round_message(
                        msg, round_index, node_of, pending, outcome, results, sent_at, max_bytes, bar
                    )
                    handle_s += time.perf_counter() - t_got
            for node in sorted(pending):
                outcome.dropped[node] = Drop(node, "timeout", f"no reply within {timeout:g}s (round_timeout)")
            self._strategy.check_round(outcome)
            t_agg = time.perf_counter()
            new_params = self._aggregator.result()
            aggregate_s = time.perf_counter() - t_agg
        except KeyboardInterrupt:
            self._monitor.discard_round()
            log.warning("round %d cancelled: the experiment is as it was before it; run again to redo it", round_index)
            raise
        except BaseException:
            self._monitor.discard_round()
            raise

        for node, drop in sorted(outcome.dropped.items()):
            log.warning("round %d: node %s dropped: %s", round_index, self._name(node), drop.reason)
            results[node] = {"node_name": self._name(node), "dropped": drop.as_dict()}
        self._set_global(new_params)
        self._rounds.put(round_index, self._global_params or {}, self._rounds.folder or self._rounds_dir())
        self._replies[round_index] = results
        self._round_current += 1
        self._monitor.end_round()
        wall = time.perf_counter() - t_start
        self._round_stats[round_index] = {
            "wall_s": wall,
            "prepare_s": prepare_s,
            "wait_s": wait_s,
            "handle_s": handle_s,
            "aggregate_s": aggregate_s,
        }
        if self._save_breakpoints:
            self.breakpoint()
        losses = [v["metrics"]["loss"] for v in results.values() if "loss" in v.get("metrics", {})]
        postfix = {"nodes": f"{len(outcome.replied)}/{len(outcome.sampled) + len(dropped)}"}
        if losses:
            postfix["loss"] = f"{sum(losses) / len(losses):.4g}"
        bar.set_postfix(postfix, refresh=False)

    def _on_round_message(
        self,
        msg: Message,
        round_index: int,
        node_of: dict[str, str],
        pending: set[str],
        outcome: RoundOutcome,
        results: dict[str, dict[str, Any]],
        sent_at: float,
        max_bytes: int,
        bar: tqdm,
    ) -> None:
        if isinstance(msg, ScalarMessage):
            if msg.round == round_index and msg.node_id in outcome.sampled:
                self._monitor.on_scalar(msg)
                loss = self._monitor.mean_loss()
                if loss is not None:
                    bar.set_postfix_str(f"loss={loss:.4g}", refresh=True)
            return
        if isinstance(msg, Presence):
            if msg.node_id in pending and not msg.online:
                pending.discard(msg.node_id)
                outcome.dropped[msg.node_id] = Drop(msg.node_id, "offline", "went offline during the round")
            return
        node = node_of.get(getattr(msg, "in_reply_to", ""))
        if node is None or node not in pending or getattr(msg, "node_id", node) != node:
            return  # a duplicate delivery, or a reply forged for another node's request
        if isinstance(msg, TaskAck):
            results.setdefault(node, {})["ack_s"] = time.perf_counter() - sent_at
            return
        if isinstance(msg, ErrorReply):
            pending.discard(node)
            err = remote_error(msg)
            outcome.dropped[node] = Drop(node, "error", str(err), err)
            return
        if not isinstance(msg, TrainReply):
            return
        pending.discard(node)
        if msg.round != round_index or msg.job_id != self._job_id:
            outcome.dropped[node] = Drop(node, "invalid", f"replied for job {msg.job_id} round {msg.round}")
            return
        try:
            check_reply(msg, self._training_data.get(node))
            blob = self._fs().download_bytes(msg.params, max_bytes=max_bytes)
            params = params_from_bytes(blob)
            check_compatible(params, self._global_params or {})
            check_params(params)
            self._aggregator.add(node, params, msg.sample_size)
        except InvalidUpdate as exc:
            outcome.dropped[node] = Drop(node, "invalid", str(exc))
            return
        except (TransferError, SerializationError, AggregationError) as exc:
            outcome.dropped[node] = Drop(node, "invalid", f"unusable parameters: {exc}")
            return
        outcome.replied.append(node)
        results[node] = {
            **results.get(node, {}),
            "node_name": msg.node_name or node,
            "dataset_id": msg.dataset_id,
            "sample_size": msg.sample_size,
            "timings": {**msg.timings, "researcher_s": time.perf_counter() - sent_at},
            "metrics": dict(msg.metrics),
            "applied_caps": dict(msg.applied_caps),
            "dropped": None,
        }

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
        got = self._connect().search(self._tags, nodes=self._nodes)
        data: dict[str, DatasetInfo] = {}
        for node, reply in sorted(got.replies.items()):
            datasets = getattr(reply, "datasets", [])
            if len(datasets) > 1:
                names = ", ".join(d.name for d in datasets)
                raise ExperimentError(
                    f"node {self._name(node)} holds {len(datasets)} datasets tagged {self._tags} ({names}); "
                    "add a tag that tells them apart"
                )
            if datasets:
                data[node] = datasets[0]
        for _node, err in sorted(got.errors.items()):
            log.warning("search: %s", err)
        if got.missing:
            log.warning("search: no reply from %s within %gs", ", ".join(got.missing), self._timeouts.request)
        self._training_data = data
        if data:
            log.info(
                "tags %s: found on %s", self._tags, ", ".join(f"{self._name(n)}:{d.name}" for n, d in data.items())
            )
        else:
            log.warning("%s", self._no_data_message(len(got.replies)))

    def _no_data_message(self, searched: int) -> str:
        online = self._connect().online_nodes(wait=False)
        where = f"{searched} node(s) answered ({', '.join(online) or 'none online'})"
        return (
            f"no node holds a dataset with all the tags {self._tags}: {where}; check the tags with "
            "exp.requests().list_datasets(), or start the nodes that hold the data"
        )

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
            fresh = plan.get_parameters()
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
        self._params_ref = None
        if self._plan is not None:
            self._plan.set_parameters(self._global_params)

    def _upload_plan(self) -> BlobRef:
        if self._plan_ref is None:
            assert self._plan_source is not None
            self._plan_ref = self._fs().upload_bytes(self._plan_source.encode("utf-8"), readers=self._target_nodes())
        return self._fs().ensure_readers(self._plan_ref, self._target_nodes())  # the store lets only these read it

    def _upload_params(self) -> BlobRef:
        if self._params_ref is None:
            assert self._global_params is not None
            blob = params_to_bytes(self._global_params)  # not kept: one model's bytes a round for nothing
            self._params_ref = self._fs().upload_bytes(blob, readers=self._target_nodes())
        return self._fs().ensure_readers(self._params_ref, self._target_nodes())

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
                raise ExperimentError(self._no_data_message(len(self._connect().online_nodes(wait=False))))

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

    def _statuses(self, got: Any, kind: type) -> dict[str, str]:
        out: dict[str, str] = {}
        for node, reply in got.replies.items():
            if isinstance(reply, kind):
                status = reply.status
                if isinstance(reply, PlanStatusReply) and not reply.approval_required:
                    status = f"not required ({status})"
                out[node] = status
        for node, err in got.errors.items():
            out[node] = f"error: {err}"
        for node in got.missing:
            out[node] = f"no reply within {self._timeouts.request:g}s"
        return dict(sorted(out.items()))


# ====================================================================== module helpers
def _resolve_credentials(network: str | Path | Credentials | None) -> Credentials:
    if isinstance(network, Credentials):
        return network
    if network is None:
        network = os.environ.get(NETWORK_ENV)
    if not network:
        raise ConfigError(f"no network given: pass network=<network folder or credentials file>, or set ${NETWORK_ENV}")
    path = Path(network).expanduser()
    if path.is_dir():
        path = path / "credentials" / "researcher.json"
    creds = Credentials.load(path)
    if creds.role != "researcher":
        raise ConfigError(f"{path}: credentials of a {creds.role}, not of a researcher")
    return creds


def _absolute(folder: str | Path) -> Path:
    """Experiment paths are absolute, so that what `breakpoint()` returns still works after a `chdir`."""
    return Path(folder).expanduser().resolve()


def _tags_list(tags: str | list[str] | None) -> list[str] | None:
    if tags is None:
        return None
    out = [tags] if isinstance(tags, str) else [str(t) for t in tags]
    if not out or any(not t for t in out):
        raise ConfigError(f"tags must be a non-empty string or list of non-empty strings, got {tags!r}")
    return out


def _instance(value: Any, base: type, what: str) -> Any:
    if isinstance(value, type) and issubclass(value, base):
        return value()
    if isinstance(value, base):
        return value
    raise ConfigError(f"{what} must be a {base.__name__} instance or subclass, got {value!r}")


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _restore(entry: dict[str, Any], base: type, what: str) -> Any:
    path = entry.get("class", "")
    module_name, _, qualname = path.partition(":")
    try:
        if module_name == "__main__":
            raise ImportError("defined in a notebook or script")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"cannot re-create the {what} {path!r} ({exc}); pass {what}=... to Experiment.load_breakpoint"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{path!r} is not a {base.__name__}")
    return obj()
