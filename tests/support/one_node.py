"""One node daemon with CSV datasets and approved plans, driven by a raw researcher (sandbox and error tests).

    node = OneNode.start(root, broker, datasets=("d1", "d2"), plans=[LOGREG_PLAN], limits={...})
    reply = node.round(plan_source, "d1", model_args={...})   # a TrainReply or an ErrorReply
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsilo.node.config import NodeConfig, node_paths
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.tables import write_sign_csv

from .client import RawResearcher
from .procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node


@dataclass
class OneNode:
    """A network, one node `n1` whose datasets share one data folder, and a raw researcher."""

    net: NetworkHandle
    node: NodeHandle
    researcher: RawResearcher
    data: Path
    datasets: dict[str, str] = field(default_factory=dict)
    """Dataset name -> dataset id."""

    @classmethod
    def start(cls, root: Path, broker: str, datasets: Sequence[str] = ("d1",), plans: Sequence[str] = (),
              node: Mapping[str, Any] | None = None, limits: Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None) -> OneNode:  # fmt: skip
        """`node`/`limits`: config.toml keys to set; `env`: the daemon's extra environment."""
        net = start_network(root / "net", broker=broker)
        data = root / "data"
        data.mkdir()
        nodedir = root / "n1"
        subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", "n1", "--network",
                        str(net.netdir), "--data-root", str(data), "--threads", "1"], check=True,
                       capture_output=True)  # fmt: skip
        cfg = NodeConfig.load(nodedir)
        for key, value in (node or {}).items():
            setattr(cfg.node, key, value)
        for key, value in (limits or {}).items():
            setattr(cfg.limits, key, value)
        cfg.save()
        store, ids = DatasetStore(nodedir), {}
        for i, name in enumerate(datasets):
            write_sign_csv(data / f"{name}.csv", 64, seed=i)
            ids[name] = store.add(name, ["demo"], "csv", data / f"{name}.csv", added_by="test")["dataset_id"]
        approve(nodedir, plans)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            handle = start_node(nodedir)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.update({key: value})
        return cls(net, handle, RawResearcher.for_network(net), data, ids)

    @property
    def nodedir(self) -> Path:
        return self.node.nodedir

    def status(self) -> dict[str, Any]:
        return json.loads(node_paths(self.nodedir).status.read_text())

    def log(self) -> str:
        return node_paths(self.nodedir).log_file.read_text(errors="replace")

    def round(self, plan: str, dataset: str = "d1", **kwargs: Any) -> Any:
        """One training round of `plan` (class HeartPlan, a 4 -> 2 linear model) on `dataset`."""
        params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
        req = self.researcher.train_request(plan, "HeartPlan", self.datasets[dataset], params=params, **kwargs)
        return self.researcher.ask("n1", req, ("train_reply", "error"))

    def stop(self) -> None:
        self.node.stop()
        self.researcher.close()
        self.net.stop()


def approve(nodedir: Path, plans: Sequence[str]) -> None:
    """Each plan source submitted and approved, as a data manager would after review."""
    store = PlanStore(nodedir)
    for source in plans:
        store.approve(store.submit(source, "HeartPlan", "raw-researcher")["sha256"], by="test", note="test plan")
