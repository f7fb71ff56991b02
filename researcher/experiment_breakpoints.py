"""`Experiment`'s breakpoints: save the state after a round, and resume from it later.

    folder = exp.breakpoint()                    # also after every round with save_breakpoints=True
    exp = Experiment.load_breakpoint(folder)     # or a root folder: the latest breakpoint in it
    exp.run(rounds=2)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedsilo.common.serialization import check_compatible
from fedsilo.network.credentials import Credentials

from .aggregators import Aggregator
from .breakpoints import read_breakpoint, save_breakpoint
from .compression import compression_setting
from .rounds import ROUNDS_DIR, RoundArchive
from .secagg import SecureAggregation
from .settings import EXPERIMENTS_ENV, ExperimentError, class_path, restore
from .strategies import Strategy

log = logging.getLogger("fedsilo.researcher.experiment")


class ExperimentBreakpoints:
    """Breakpoint verbs mixed into `Experiment` (which holds the attributes they read and write)."""

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
            "aggregator": {"class": class_path(self._aggregator), "settings": self._aggregator.settings()},
            "strategy": {"class": class_path(self._strategy), "state": self._strategy.state()},
            "secure_aggregation": SecureAggregation.state_of(self._secagg),  # a resumed job stays secure
            "compression": self._compression.model_dump(mode="json") if self._compression else None,
            "tensorboard": self._tensorboard,
            "save_breakpoints": self._save_breakpoints,
            "experimentation_folder": str(self._root),
            **self._history.state(),
            "monitor": self._monitor.state(),
            "round_digests": {str(r): h for r, h in sorted(self._rounds.hashes().items())},
        }
        folder = save_breakpoint(
            self.experimentation_path(), self._round_current, state, self._global_params, self._plan_source,
            algorithm_state=self._aggregator.state(), saved=self._rounds.saved(self._round_current - 1,
                                                                                self._global_params),
        )  # fmt: skip
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
    ) -> Any:  # an Experiment (this mixin's class)
        """Resume from a breakpoint folder, an experiment folder or a root (default: the latest one).

        The plan is rebuilt from the saved source, so its hash (and the nodes' approval) is unchanged.
        An aggregator or strategy defined in a notebook cannot be re-imported: pass it again here.
        """
        if path is None:
            path = Path(os.environ.get(EXPERIMENTS_ENV) or "experiments")
        folder, state, params, source, algorithm_state = read_breakpoint(path)
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
        settings = state["aggregator"].get("settings", {})
        exp._aggregator = aggregator or restore(state["aggregator"], Aggregator, "aggregator", **settings)
        exp._strategy = node_selection_strategy or restore(state["strategy"], Strategy, "node_selection_strategy")
        exp._secagg = SecureAggregation.from_state(state.get("secure_aggregation"), exp._aggregator)
        exp._compression = compression_setting(state.get("compression"), exp._secagg)
        if aggregator is None:
            exp._aggregator.load_state(*algorithm_state)
        if node_selection_strategy is None:
            exp._strategy.load_state(state["strategy"].get("state", {}))
        exp._history.load_state(state)
        if exp._round_current > 0:
            # `round_sha256`: a breakpoint from before the archive's digests were BLAKE3 blob keys
            recorded = state.get("round_digests", state.get("round_sha256", {}))
            hashes = {int(r): h for r, h in recorded.items()}
            current = (exp._round_current - 1, exp._global_params or {})
            exp._rounds = RoundArchive(folder.parent / ROUNDS_DIR, current, hashes)
        exp.set_tensorboard(bool(state.get("tensorboard")))
        exp._monitor.load_state(state.get("monitor", {}))
        log.info("resumed %s after round %d", folder, exp._round_current)
        return exp
