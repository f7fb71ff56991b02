"""The e2e federation: plans, data and helpers shared by the e2e modules (fixtures in conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.synthetic import FEATURES, features_and_labels, synthetic_cohort
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.node.datasets import DatasetStore
from fedsilo.researcher import Experiment
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle

TAG = "cohort"
ROWS = 240
HOSPITALS = {"hospital-a": 0.2, "hospital-b": 0.5, "hospital-c": 0.8}  # share of positive cases: label skew
MODEL_ARGS = {"n_features": FEATURES}
TRAINING_ARGS = {"epochs": 1, "batch_size": 16, "optimizer_args": {"lr": 0.2}, "log_interval": 5, "random_seed": 1}
# Enough single-sample steps that a round lasts seconds: a daemon can be killed while it trains.
SLOW_ARGS = {**TRAINING_ARGS, "num_updates": 2500, "batch_size": 1, "log_interval": 100}


class LogReg(TorchTrainingPlan):
    """Logistic regression on the cohort's tabular features."""

    def init_model(self, model_args):
        model = nn.Linear(model_args["n_features"], 2)
        # A zero start predicts one class for everyone: exactly 50% on a balanced held-out set.
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


class Unreviewed(TorchTrainingPlan):
    """A plan no data manager has seen."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


# ------------------------------------------------------------------------------------------ helpers
def fedsilo(*args: str) -> str:
    """One `fedsilo` command, as a node administrator or data manager types it."""
    done = subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"fedsilo {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def balanced_heldout(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A test set with exactly as many positive as negative cases, from none of the nodes' cohorts."""
    rng = np.random.default_rng(99)
    table = np.vstack([synthetic_cohort(rng, rows // 2, 0.0), synthetic_cohort(rng, rows // 2, 1.0)])
    x, y = features_and_labels(table)
    return torch.from_numpy(x), torch.from_numpy(y)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(interval)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def node_status(nodedir: Path) -> dict:
    """The daemon's status.json (pid, broker connection, worker pid)."""
    return json.loads((nodedir / "status.json").read_text(encoding="utf-8"))


def import_plan(source: str, name: str, folder: Path) -> type:
    """Import plan source from a real file, as a researcher's own module, so `Experiment` extracts it."""
    module_name = f"e2e_plan_{abs(hash(source)):x}"
    path = folder / f"{module_name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource finds the class's file through sys.modules
    spec.loader.exec_module(module)
    return getattr(module, name)


class Trap:
    """Unpickling this creates `marker`: what a hostile parameters file would do, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@dataclass
class Federation:
    broker: str
    root: Path
    network: NetworkHandle
    nodes: dict[str, NodeHandle]
    datasets: dict[str, str]  # node -> dataset id
    heldout: tuple[torch.Tensor, torch.Tensor]

    @property
    def netdir(self) -> Path:
        return self.network.netdir

    def nodedir(self, name: str) -> Path:
        return self.nodes[name].nodedir

    def experiment(self, folder: Path, plan: type = LogReg, **kw) -> Experiment:
        return Experiment(
            tags=kw.pop("tags", [TAG]),
            training_plan_class=plan,
            model_args=MODEL_ARGS,
            training_args=kw.pop("training_args", TRAINING_ARGS),
            round_limit=kw.pop("round_limit", 3),
            network=self.netdir,
            experimentation_folder=folder / "experiments",
            round_timeout=kw.pop("round_timeout", 120),
            **kw,
        )


def _register(root: Path, netdir: Path, name: str, csv: Path) -> str:
    """A node created and its dataset registered through the CLI; returns the dataset id."""
    nodedir = root / name
    # --threads 1: three nodes share two cores; torch's default thread count makes rounds much slower.
    fedsilo("node", "init", "--dir", str(nodedir), "--name", name, "--network", str(netdir),
            "--data-root", str(csv.parent), "--threads", "1")  # fmt: skip
    fedsilo("node", "dataset", "add", "--dir", str(nodedir), "--name", f"{name}-cohort", "--tags", f"{TAG},tabular",
            "--type", "csv", "--path", str(csv), "--target", "label")  # fmt: skip
    return DatasetStore(nodedir).get(f"{name}-cohort")["dataset_id"]


@dataclass
class Approved:
    sha256: str
    source: str


def zero_params() -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(2, FEATURES), "bias": torch.zeros(2)}


def register_and_start(
    root: Path, netdir: Path, csvs: dict[str, Path], nodes: dict[str, NodeHandle]
) -> dict[str, str]:
    """One node per CSV, created and registered through the CLI (runs overlapped: they are independent),
    then started as daemons; `nodes` is filled as they start (the caller stops them). Node -> dataset id."""
    with ThreadPoolExecutor(len(csvs)) as pool:
        ids = list(pool.map(lambda n: _register(root, netdir, n, csvs[n]), csvs))
    for name in csvs:
        nodes[name] = NodeHandle(nodedir=root / name, log_path=root / name / "logs" / "daemon.out")
        nodes[name].start(wait=False)
    for handle in nodes.values():
        handle.wait_ready()
    return dict(zip(csvs, ids, strict=True))
