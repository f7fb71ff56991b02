"""Live training feedback: node scalars into TensorBoard and the progress bar, node logs into logging."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsilo.network.messages import LogMessage, ScalarMessage

log = logging.getLogger("fedsilo.researcher.nodes")

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


class Monitor:
    """Collects what nodes stream during rounds.

    With `tensorboard_dir`, one SummaryWriter per node writes `TRAINING/<key>` (and
    `VALIDATION/<key>`) with a step that keeps counting across rounds. The federation's metrics go to
    the run `all nodes` (a name no node id can take: ids have no space) with the round as the step:
    `ROUND/global_<name>` and `ROUND/test_<name>` per training round, `EVALUATION/<name>` per
    `Experiment.evaluate()` (step: the rounds done); each node's own values go to its run under the same
    tags. Existing event files are kept: a resumed experiment appends to its curves.
    """

    FEDERATION_RUN = "all nodes"

    def __init__(self, tensorboard_dir: Path | None = None, keep_logs: int = 500) -> None:
        self.tensorboard_dir = tensorboard_dir
        self._writers: dict[str, Any] = {}
        self._offsets: dict[str, int] = {}
        self._round_max: dict[str, int] = {}
        self.last: dict[str, dict[str, float]] = {}
        self.logs: deque[LogMessage] = deque(maxlen=keep_logs)

    # ------------------------------------------------------------------ events
    def on_scalar(self, msg: ScalarMessage) -> None:
        node = msg.node_id
        self.last.setdefault(node, {})[msg.key] = msg.value
        self._round_max[node] = max(self._round_max.get(node, 0), msg.step)
        if self.tensorboard_dir is not None:
            section = "TRAINING" if msg.train else "VALIDATION"
            self._writer(node).add_scalar(f"{section}/{msg.key}", msg.value, self._offsets.get(node, 0) + msg.step)

    def on_log(self, msg: LogMessage) -> None:
        self.logs.append(msg)
        log.log(_LEVELS.get(msg.level, logging.INFO), "node %s: %s", msg.node_id, msg.text)

    def federation_scalars(self, section: str, metrics: dict[str, float], step: int) -> None:
        """The federation's metrics (`ROUND` or `EVALUATION`) at `step`; nothing while TensorBoard is off."""
        self._scalars(self.FEDERATION_RUN, section, metrics, step)

    def round_scalars(self, section: str, federation: dict[str, float], nodes: Mapping[str, dict[str, float]],
                      step: int) -> None:  # fmt: skip
        """Each node's evaluation metrics in its own run and the federation's (weighted) in `all nodes`, under
        the same tags (`ROUND/test_auc`), so that TensorBoard draws the nodes' curves and the global one in
        one chart."""
        for node, metrics in sorted(nodes.items()):
            self._scalars(node, section, metrics, step)
        self.federation_scalars(section, federation, step)

    def _scalars(self, run: str, section: str, metrics: dict[str, float], step: int) -> None:
        if self.tensorboard_dir is None or not metrics:
            return
        writer = self._writer(run)
        for key, value in sorted(metrics.items()):
            writer.add_scalar(f"{section}/{key}", value, step)
        writer.flush()

    def end_round(self) -> None:
        """Steps of the next round continue after the last step of this one."""
        for node, top in self._round_max.items():
            self._offsets[node] = self._offsets.get(node, 0) + top
        self._round_max.clear()
        for writer in self._writers.values():
            writer.flush()

    def discard_round(self) -> None:
        """A cancelled round: its steps will be redone, so they do not advance the offsets."""
        self._round_max.clear()

    def mean_loss(self) -> float | None:
        losses = [m["loss"] for m in self.last.values() if "loss" in m]
        return sum(losses) / len(losses) if losses else None

    # ------------------------------------------------------------------ state
    def set_tensorboard_dir(self, path: Path | None) -> None:
        if path != self.tensorboard_dir:
            self.close()
            self.tensorboard_dir = path
        if path is not None:
            # Imported now rather than at the first scalar, so that the cost is not paid inside a round.
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    def state(self) -> dict[str, Any]:
        return {"offsets": dict(self._offsets)}

    def load_state(self, state: dict[str, Any]) -> None:
        self._offsets = {str(k): int(v) for k, v in state.get("offsets", {}).items()}

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def _writer(self, node: str) -> Any:
        writer = self._writers.get(node)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # late: tensorboard is slow to import

            assert self.tensorboard_dir is not None
            writer = SummaryWriter(log_dir=str(self.tensorboard_dir / node))
            self._writers[node] = writer
        return writer
