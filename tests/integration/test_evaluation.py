"""Evaluation on node daemons (processes) over each broker, driven by an `Experiment`.

`test_on_global_updates` measures the model a node received, before its training; `Experiment.evaluate()`
measures the current global model on every node, without training and without any upload from the nodes
(read from the file store's own index); the federation's numbers are the means weighted by the test splits;
an unapproved plan is refused as for training. Every expected number is computed here, in plain torch, from
the node's CSV and its held-out indices (the split is `DataManager.split`'s, fixed by `random_seed`)."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.plan_source import plan_source
from fedsilo.common.training_args import TrainingArgs
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from fedsilo.researcher import EvaluationFailed, Experiment
from fedsilo.researcher.monitor import Monitor
from tests.support.brokers import BOTH
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

TAG = "eval-demo"
ROWS = {"hospital-a": 40, "hospital-b": 80}  # test splits of 10 and 20 at test_ratio 0.25: unequal weights
MODEL_ARGS = {"n_features": 4}
ARGS = {"epochs": 2, "batch_size": 8, "optimizer_args": {"lr": 0.5}, "test_ratio": 0.25, "random_seed": 3,
        "test_on_global_updates": True}  # fmt: skip


class LogReg(TorchTrainingPlan):
    """Logistic regression on 4 CSV features; the default testing_step (loss, accuracy)."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


class NotReviewed(TorchTrainingPlan):
    """Never approved on any node."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target) * 1.0


@dataclass
class Setup:
    network: NetworkHandle
    nodes: dict[str, NodeHandle]
    csv: dict[str, Path]


def _write_csv(path: Path, rows: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(rows, 4))
    y = (x[:, 0] - 0.5 * x[:, 2] > 0).astype(int)
    path.write_text("a,b,c,d,label\n" + "".join(",".join(f"{v:.5f}" for v in r) + f",{t}\n"
                                                for r, t in zip(x, y, strict=True)))  # fmt: skip


@pytest.fixture(scope="module", params=BOTH)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp(f"evaluation-{request.param}")
    net = start_network(root, broker=request.param)
    nodes: dict[str, NodeHandle] = {}
    csv: dict[str, Path] = {}
    try:
        for seed, (name, rows) in enumerate(ROWS.items()):
            data, nodedir = root / f"data-{name}", root / name
            data.mkdir()
            csv[name] = data / "d.csv"
            _write_csv(csv[name], rows, seed)
            subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", name, "--network",
                            str(net.netdir), "--data-root", str(data), "--threads", "1"],
                           check=True, capture_output=True)  # fmt: skip
            DatasetStore(nodedir).add(f"{name}-csv", [TAG], "csv", csv[name], added_by="test")
            plans = PlanStore(nodedir)  # the data manager approved LogReg; NotReviewed stays pending
            plans.approve(plans.submit(plan_source(LogReg), "LogReg", "researcher")["sha256"], by="dm", note="ok")
            nodes[name] = NodeHandle(nodedir=nodedir, log_path=nodedir / "daemon.out")
            nodes[name].start(wait=False)  # both start up at once
        for node in nodes.values():
            node.wait_ready()
        yield Setup(net, nodes, csv)
    finally:
        for node in nodes.values():
            node.stop()
        net.stop()


def _experiment(s: Setup, folder: Path, plan: type = LogReg, **kw) -> Experiment:
    return Experiment(tags=[TAG], training_plan_class=plan, model_args=MODEL_ARGS,
                      training_args=kw.pop("training_args", ARGS), round_limit=1, network=s.network.netdir,
                      experimentation_folder=folder, round_timeout=120, **kw)  # fmt: skip


def _expected(params: dict[str, torch.Tensor], csv: Path, args: dict) -> tuple[dict[str, float], int]:
    """Loss and accuracy of `params` on the node's test split (its whole dataset when test_ratio is 0),
    in plain torch: the node must have evaluated this model on these samples."""
    ta = TrainingArgs.parse(args)
    dataset = CsvDataset(csv)
    _, test = DataManager(dataset, batch_size=8).split(ta.test_ratio, seed=ta.random_seed or 0)
    indices = list(test.dataset.indices) if test is not None else list(range(len(dataset)))
    x = torch.stack([dataset[i][0] for i in indices])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in indices])
    model = nn.Linear(4, 2)
    model.load_state_dict(params)
    with torch.no_grad():
        out = model(x)
    loss = float(nn.functional.cross_entropy(out, y))
    return {"loss": loss, "accuracy": float((out.argmax(1) == y).float().mean())}, len(indices)


def _node_uploads(s: Setup, node: str) -> set[tuple[str, str]]:
    """(sha256, last_used_at) of every blob `node` uploaded, from the file store's own index: a new upload
    adds a row, re-sending a blob it had stored refreshes its time."""
    db = sqlite3.connect(s.network.netdir / "filestore" / "db.sqlite3")
    try:
        rows = db.execute("SELECT b.key, b.last_used_at FROM filestore_access a JOIN filestore_blob b "
                          "ON a.blob_id = b.key WHERE a.party = ? AND a.uploader", (node,)).fetchall()  # fmt: skip
    finally:
        db.close()
    return set(rows)


def _weighted(per_node: dict[str, tuple[dict[str, float], int]]) -> dict[str, float]:
    total = sum(n for _, n in per_node.values())
    return {k: sum(m[k] * n for m, n in per_node.values()) / total for k in ("loss", "accuracy")}


def test_global_updates_are_tested_before_training_and_the_round_records_weighted_means(
    setup: Setup, tmp_path: Path
) -> None:
    with _experiment(setup, tmp_path, tensorboard=True) as exp:
        received = {k: v.clone() for k, v in exp.training_plan().get_parameters().items()}
        assert exp.run() == 1
        replies = exp.training_replies()[0]
        expected = {node: _expected(received, setup.csv[node], ARGS) for node in ROWS}
        for node, (metrics, n_test) in expected.items():
            reply = replies[node]
            assert reply["dropped"] is None and reply["test_samples"] == n_test == ROWS[node] // 4
            assert reply["metrics"]["global_loss"] == pytest.approx(metrics["loss"], rel=1e-5)
            assert reply["metrics"]["global_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
            assert "test_loss" in reply["metrics"] and reply["metrics"]["test_loss"] != reply["metrics"]["global_loss"]
        means = exp._history.round_metrics[0]
        assert means["global_accuracy"] == pytest.approx(_weighted(expected)["accuracy"], abs=1e-6)
        assert means["global_loss"] == pytest.approx(_weighted(expected)["loss"], rel=1e-5)
        local = {n: ({k: replies[n]["metrics"][f"test_{k}"] for k in ("loss", "accuracy")}, replies[n]["test_samples"])
                 for n in ROWS}  # fmt: skip
        assert means["test_loss"] == pytest.approx(_weighted(local)["loss"], rel=1e-9)
        assert "global_accuracy" in exp.metrics_table(per="round")
        board = EventAccumulator(str(exp.tensorboard_dir() / Monitor.FEDERATION_RUN)).Reload()
        assert [(e.step, e.value) for e in board.Scalars("ROUND/global_accuracy")] == [
            (0, pytest.approx(means["global_accuracy"]))]  # fmt: skip


def test_evaluate_measures_the_current_global_model_and_nothing_leaves_the_nodes(setup: Setup, tmp_path: Path) -> None:
    with _experiment(setup, tmp_path, training_args={**ARGS, "test_on_global_updates": False}) as exp:
        before_training = {node: _node_uploads(setup, node) for node in ROWS}
        assert exp.run() == 1
        for node in ROWS:  # the probe sees a node's upload (this model's update itself travels inline, issue 11)
            with FileStoreClient(setup.network.credentials(node).filestore) as files:
                files.upload_bytes(f"probe {node}".encode())
        trained = {node: _node_uploads(setup, node) for node in ROWS}
        assert all(trained[n] - before_training[n] for n in ROWS)
        current = {k: v.clone() for k, v in exp.training_plan().get_parameters().items()}
        report = exp.evaluate()
        assert {node: _node_uploads(setup, node) for node in ROWS} == trained  # no blob sent, none re-sent
        assert report.round == 1 and sorted(report.nodes) == sorted(ROWS) and not report.dropped
        expected = {node: _expected(current, setup.csv[node], ARGS) for node in ROWS}
        for node, (metrics, n_test) in expected.items():
            assert report.nodes[node].sample_size == n_test
            assert report.nodes[node].metrics == pytest.approx(metrics, rel=1e-5, abs=1e-6)
        assert report.metrics == pytest.approx(_weighted(expected), rel=1e-5, abs=1e-6)
        assert exp.round_current() == 1 and exp.training_plan().get_parameters()["weight"].equal(current["weight"])

        exp.set_training_args({**ARGS, "test_ratio": 0.0, "test_on_global_updates": False})
        whole = exp.evaluate()  # no test split: each node's whole dataset
        for node in ROWS:
            metrics, n = _expected(current, setup.csv[node], {"test_ratio": 0.0})
            assert n == ROWS[node] and whole.nodes[node].sample_size == n
            assert whole.nodes[node].metrics == pytest.approx(metrics, rel=1e-5, abs=1e-6)
        assert {node: _node_uploads(setup, node) for node in ROWS} == trained


def test_an_evaluation_with_a_plan_the_nodes_did_not_approve_is_refused(setup: Setup, tmp_path: Path) -> None:
    with _experiment(setup, tmp_path, plan=NotReviewed) as exp:
        with pytest.raises(EvaluationFailed, match="FS300") as raised:
            exp.evaluate()
        assert all(node in str(raised.value) for node in ROWS) and "not approved" in str(raised.value)
