"""A real federated experiment: network + 2 node daemons as processes, registered through the node CLI.

The researcher's bookkeeping (search, replies, TensorBoard, breakpoints) is tested here; refusals,
learning and drop-outs with three nodes on each broker in tests/e2e/test_federation.py."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.researcher import Experiment
from tests.support.procs import FEDSILO, NodeHandle, start_network

TAG = "fl-demo"
NODES = ("hospital-a", "hospital-b")
log = logging.getLogger(__name__)


class LogReg(TorchTrainingPlan):
    """Logistic regression on 4 CSV features."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=False)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


MODEL_ARGS = {"n_features": 4}
TRAINING_ARGS = {"epochs": 3, "batch_size": 64, "optimizer_args": {"lr": 0.3}, "log_interval": 1, "random_seed": 1}


# ------------------------------------------------------------------------------------------ processes
def _cli(*args: str) -> str:
    done = subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"fedsilo {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    handle = start_network(tmp_path_factory.mktemp("net"))
    yield handle.netdir
    handle.stop()


def _write_csv(path: Path, seed: int, n: int = 64) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    rows = "".join(",".join(f"{v:.5f}" for v in r) + f",{t}\n" for r, t in zip(x, y, strict=True))
    path.write_text("a,b,c,d,label\n" + rows, encoding="utf-8")


@pytest.fixture(scope="module")
def nodes(network: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeHandle]]:
    """Two nodes registered with the CLI, their daemons running and connected; name -> handle."""
    root = tmp_path_factory.mktemp("nodes")
    running: dict[str, NodeHandle] = {}
    try:
        for i, name in enumerate(NODES):
            data = root / f"data-{name}"
            data.mkdir()
            _write_csv(data / "train.csv", seed=i)
            nodedir = root / name
            _cli("node", "init", "--dir", str(nodedir), "--name", name, "--network", str(network),
                 "--data-root", str(data), "--threads", "1")  # fmt: skip
            _cli("node", "dataset", "add", "--dir", str(nodedir), "--name", f"{name}-csv", "--tags", TAG,
                 "--type", "csv", "--path", str(data / "train.csv"), "--target", "label")  # fmt: skip
            running[name] = NodeHandle(nodedir=nodedir, log_path=nodedir / "daemon.log")
            running[name].start(wait=False)  # both daemons start up at once
        for node in running.values():
            node.wait_ready()
        yield running
    finally:
        for node in running.values():
            node.stop()


@pytest.fixture(scope="module")
def approved(network, nodes) -> str:
    """LogReg submitted through the SDK, then approved by each data manager through the CLI."""
    with Experiment(tags=[TAG], training_plan_class=LogReg, model_args=MODEL_ARGS, network=network) as exp:
        status = exp.training_plan_approve(description="integration test")
        assert set(status) == set(NODES) and set(status.values()) <= {"pending", "approved"}
        sha = exp.training_plan_hash()
        for node in nodes.values():
            _cli("node", "plan", "approve", "--dir", str(node.nodedir), sha, "--by", "dm")
        assert set(exp.check_training_plan_status().values()) == {"approved"}
    return sha


def _experiment(network: Path, tmp_path: Path, **kw) -> Experiment:
    return Experiment(
        tags=kw.pop("tags", [TAG]),
        training_plan_class=kw.pop("training_plan_class", LogReg),
        model_args=MODEL_ARGS,
        training_args=kw.pop("training_args", TRAINING_ARGS),
        round_limit=kw.pop("round_limit", 3),
        network=network,
        experimentation_folder=tmp_path / "experiments",
        round_timeout=kw.pop("round_timeout", 120),
        **kw,
    )


# ------------------------------------------------------------------------------------------ tests
def test_search_finds_both_nodes(network, nodes) -> None:
    with _experiment(network, Path("/nonexistent")) as exp:
        assert sorted(exp.training_data()) == sorted(NODES)
        assert {d.name for d in exp.training_data().values()} == {f"{n}-csv" for n in NODES}


def test_fedavg_rounds_are_recorded(network, nodes, approved, tmp_path) -> None:
    """What an experiment keeps of its rounds; that FedAvg learns is tested end to end on both brokers."""
    with _experiment(network, tmp_path, tensorboard=True) as exp:
        assert exp.training_plan_hash() == approved
        assert exp.run() == 3
        replies = exp.training_replies()
        assert sorted(replies) == [0, 1, 2]
        for r in replies.values():
            assert sorted(r) == sorted(NODES) and all(v["dropped"] is None for v in r.values())
            assert all(v["sample_size"] == 64 for v in r.values())
        assert all("loss" in v["metrics"] for r in replies.values() for v in r.values())
        assert sorted(exp.aggregated_params()) == [0, 1, 2]
        assert "hospital-a" in exp.metrics_table()
        assert list((exp.experimentation_path() / "tensorboard").iterdir())
        for r, stats in exp.round_stats().items():
            node_s = max(v["timings"]["total_s"] for v in replies[r].values())
            log.warning(
                "round %d: wall %.1f ms, node total %.1f ms, researcher overhead %.1f ms (prepare %.1f, handle %.1f)",
                r, 1e3 * stats["wall_s"], 1e3 * node_s,
                1e3 * (stats["prepare_s"] + stats["handle_s"] + stats["aggregate_s"]),
                1e3 * stats["prepare_s"], 1e3 * stats["handle_s"],
            )  # fmt: skip


def test_breakpoint_resume_continues_rounds(network, nodes, approved, tmp_path) -> None:
    with _experiment(network, tmp_path, save_breakpoints=True, round_limit=2) as exp:
        assert exp.run(rounds=1) == 1
        first = exp.training_plan().get_parameters()
    resumed = Experiment.load_breakpoint(tmp_path / "experiments", network=network)
    with resumed:
        assert resumed.round_current() == 1 and resumed.training_plan_hash() == approved
        assert all((resumed.training_plan().get_parameters()[k] == v).all() for k, v in first.items())
        assert resumed.run() == 1
        assert resumed.round_current() == 2
        assert sorted(resumed.training_replies()) == [0, 1]
        assert (resumed.experimentation_path() / "breakpoint_0002").is_dir()
