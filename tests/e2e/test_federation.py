"""End to end, on each broker: one network, three hospital node daemons (separate processes, data
registered and plans approved through the node CLI) and a researcher's `Experiment`. No mocks.

The network and the three nodes are shared by the module's tests (one set per broker); the tests
that kill daemons run last and start them again, so every test finds three nodes running.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.errors import RemoteError
from fedsilo.common.synthetic import FEATURES, features_and_labels, synthetic_cohort, write_cohort_csv
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.messages import PingRequest
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from fedsilo.researcher import Experiment, ExperimentError
from tests.support.client import RawResearcher
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network

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


@pytest.fixture(scope="module", params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def fed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    broker = request.param
    root = tmp_path_factory.mktemp(f"e2e-{broker}")
    network = start_network(root, broker=broker)
    nodes: dict[str, NodeHandle] = {}
    try:
        assert network.broker_kind == broker
        rng = np.random.default_rng(2024)
        csvs = {}
        for name, share in HOSPITALS.items():
            (root / f"data-{name}").mkdir()
            csvs[name] = root / f"data-{name}" / "cohort.csv"
            write_cohort_csv(csvs[name], synthetic_cohort(rng, ROWS, share))
        with ThreadPoolExecutor(len(HOSPITALS)) as pool:  # the CLI runs are independent: overlap them
            ids = list(pool.map(lambda n: _register(root, network.netdir, n, csvs[n]), HOSPITALS))
        for name in HOSPITALS:
            nodes[name] = NodeHandle(nodedir=root / name, log_path=root / name / "logs" / "daemon.out")
            nodes[name].start(wait=False)
        for handle in nodes.values():
            handle.wait_ready()
        yield Federation(broker, root, network, nodes, dict(zip(HOSPITALS, ids, strict=True)), balanced_heldout(2000))
    finally:
        for handle in nodes.values():
            handle.stop()
        network.stop()


@dataclass
class Approved:
    sha256: str
    source: str


@pytest.fixture(scope="module")
def approved(fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> Approved:
    """LogReg submitted for review by the researcher, then approved by each data manager with the CLI."""
    with fed.experiment(tmp_path_factory.mktemp("approve")) as exp:
        assert exp.training_plan_approve(description="e2e") == dict.fromkeys(HOSPITALS, "pending")
        sha = exp.training_plan_hash()
        for name in HOSPITALS:
            out = fedsilo("node", "plan", "approve", sha, "--dir", str(fed.nodedir(name)), "--note", "reviewed: e2e")
            assert "approved" in out
        assert exp.check_training_plan_status() == dict.fromkeys(HOSPITALS, "approved")
        return Approved(sha, exp.training_plan_file())


@pytest.fixture(scope="module")
def client(fed: Federation) -> Iterator[RawResearcher]:
    researcher = RawResearcher(fed.network.credentials("researcher"))
    yield researcher
    researcher.close()


def zero_params() -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(2, FEATURES), "bias": torch.zeros(2)}


# ------------------------------------------------------------------------------------------ tests
def test_unknown_tag_finds_no_node(fed: Federation, tmp_path: Path) -> None:
    with fed.experiment(tmp_path, tags=["no-such-tag"]) as exp:
        assert exp.training_data() == {}
        with pytest.raises(ExperimentError) as info:
            exp.run_once()
    message = str(info.value)
    # clear: which tags, that every node answered, and what to do
    assert "no-such-tag" in message and "3 node(s) answered" in message, message
    assert all(name in message for name in HOSPITALS), message
    assert exp.round_current() == 0


def test_unapproved_plan_is_refused_and_recorded_pending(fed: Federation, tmp_path: Path) -> None:
    with fed.experiment(tmp_path, plan=Unreviewed) as exp:
        sha = exp.training_plan_hash()
        with pytest.raises(RemoteError, match=sha) as info:
            exp.run_once()
        assert info.value.code == "FS300" and info.value.node in HOSPITALS
        assert exp.round_current() == 0
        assert exp.check_training_plan_status() == dict.fromkeys(HOSPITALS, "pending")
    for name in HOSPITALS:
        listed = fedsilo("node", "plan", "list", "--dir", str(fed.nodedir(name)), "--status", "pending")
        assert sha[:16] in listed and "Unreviewed" in listed, listed
        assert PlanStore(fed.nodedir(name)).status(sha) == "pending"


def test_fedavg_over_three_nodes_learns(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    x, y = fed.heldout
    with fed.experiment(tmp_path, round_limit=3) as exp:
        assert exp.training_plan_hash() == approved.sha256
        initial = accuracy(exp.training_plan().model(), x, y)
        assert exp.run() == 3
        replies = exp.training_replies()
        assert sorted(replies) == [0, 1, 2]
        for r in replies.values():
            assert sorted(r) == sorted(HOSPITALS)
            assert all(v["dropped"] is None and v["sample_size"] == ROWS for v in r.values()), r
            assert {v["dataset_id"] for v in r.values()} == set(fed.datasets.values())
        losses = [np.mean([v["metrics"]["loss"] for v in replies[r].values()]) for r in sorted(replies)]
        assert losses[-1] < losses[0], losses
        final = accuracy(exp.training_plan().model(), x, y)
    # the aggregated model learned the shared boundary despite each node's skewed labels
    assert initial == pytest.approx(0.5) and final > initial + 0.2, (initial, final)


def test_plan_changed_by_one_character_is_refused(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    changed = approved.source.replace("tabular features.", "tabular features!")
    variant = import_plan(changed, "LogReg", tmp_path)
    with fed.experiment(tmp_path, plan=variant) as exp:
        shipped = exp.training_plan_file()
        assert len(shipped) == len(approved.source)
        assert sum(a != b for a, b in zip(shipped, approved.source, strict=True)) == 1
        sha = exp.training_plan_hash()
        with pytest.raises(RemoteError, match=sha) as info:
            exp.run_once()
        assert info.value.code == "FS300"
        assert exp.check_training_plan_status() == dict.fromkeys(HOSPITALS, "pending")
    for name in HOSPITALS:
        store = PlanStore(fed.nodedir(name))
        assert store.status(approved.sha256) == "approved" and store.status(sha) == "pending"


def test_pickle_parameters_are_refused_unloaded(
    fed: Federation, approved: Approved, client: RawResearcher, tmp_path: Path
) -> None:
    # The payload is live: unpickled here, it creates its marker.
    probe = tmp_path / "probe-unpickled"
    pickle.loads(pickle.dumps(Trap(probe))).close()
    assert probe.exists()

    name = "hospital-b"
    marker = tmp_path / "node-unpickled"
    worker_before = node_status(fed.nodedir(name)).get("worker_pid")
    hostile = client.files.upload_bytes(pickle.dumps({"weight": Trap(marker), "bias": Trap(marker)}))
    req = client.train_request(approved.source, "LogReg", fed.datasets[name], params_ref=hostile, model_args=MODEL_ARGS)
    reply = client.ask(name, req, ("train_reply", "error"))
    assert reply.kind == "error", reply
    assert reply.code == "FS400" and reply.stage == "params", reply
    assert not marker.exists()
    assert fed.nodes[name].alive
    assert client.ping(name).node_id == name
    # refused by the parameter check itself, not by a crash of the worker
    assert node_status(fed.nodedir(name)).get("worker_pid") == worker_before


def test_malformed_and_oversized_messages_are_answered(fed: Federation, client: RawResearcher) -> None:
    name, me = "hospital-a", client.party.encode()
    client.send_raw(name, b'{"sender": "' + me + b'", "request_id": "bad1", "kind": ')
    assert client.wait("bad1", ("error",), timeout=30).code == "FS100"
    # valid JSON, wrong schema: a train request without its plan or parameters
    client.send_raw(name, b'{"sender": "' + me + b'", "request_id": "bad2", "kind": "train_request", "round": 0}')
    err = client.wait("bad2", ("error",), timeout=30)
    assert err.code == "FS100" and err.stage == "receive", err
    big = b'{"sender": "' + me + b'", "request_id": "big1", "pad": "' + b"x" * 300_000 + b'"}'
    client.send_raw(name, big)
    assert client.wait("big1", ("error",), timeout=30).code == "FS100"
    client.send_raw(name, bytes(range(256)) * 4)  # no sender to answer: only logged
    assert fed.nodes[name].alive
    assert client.ask(name, PingRequest(sender=client.party), ("ping_reply",)).node_id == name


def test_queued_task_survives_a_daemon_restart(fed: Federation, approved: Approved, client: RawResearcher) -> None:
    name = "hospital-a"
    node = fed.nodes[name]
    req = client.train_request(approved.source, "LogReg", fed.datasets[name], params=zero_params(),
                               model_args=MODEL_ARGS, **SLOW_ARGS)  # fmt: skip
    client.send(name, req)
    client.wait(req.request_id, ("task_ack",))
    node.stop(signal.SIGKILL)  # no farewell: the worker dies with it, the task stays unacked in the queue
    # a reply now would mean the task finished before the kill and the restart proves nothing
    assert [m.kind for m in client.received(req.request_id)] == []
    node.start()
    # ready means this daemon is connected, not the killed one whose status.json still says so
    assert node_status(node.nodedir)["pid"] == node.proc.pid
    reply = client.wait(req.request_id, ("train_reply", "error"), timeout=240)
    assert reply.kind == "train_reply", reply
    assert reply.sample_size == ROWS
    log = (node.nodedir / "logs" / "node.log").read_text(encoding="utf-8").splitlines()
    starts = [line for line in log if f"node '{name}' started" in line]
    assert "1 queued task(s)" in starts[-1], starts  # run again from the queue, not sent again


def test_node_killed_mid_round_is_dropped_and_rejoins(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    """Runs last: kills hospital-c's daemon during a round, goes on without it, then restarts it."""
    victim = "hospital-c"
    survivors = sorted(set(HOSPITALS) - {victim})
    with fed.experiment(tmp_path, training_args=SLOW_ARGS, round_timeout=60) as exp:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                exp.run_once()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        # kill it once it streams training scalars: mid-round, after it acknowledged the task
        wait_for(lambda: victim in exp.monitor().last or not worker.is_alive(), 120, f"{victim} training")
        assert worker.is_alive(), errors
        fed.nodes[victim].stop(signal.SIGKILL)
        worker.join(180)
        assert not worker.is_alive() and not errors, errors

        first = exp.training_replies()[0]
        assert all(first[n]["dropped"] is None for n in survivors), first
        assert first[victim]["dropped"]["kind"] in {"offline", "timeout"}, first[victim]
        rows = {line.split()[1]: line for line in exp.metrics_table().splitlines()[2:] if line.startswith("0 ")}
        assert "dropped" in rows[victim] and "dropped" not in rows[survivors[0]], rows

        # the experiment goes on with the two others
        exp.set_training_args(TRAINING_ARGS)
        assert exp.run_once() == 1
        second = exp.training_replies()[1]
        assert second[victim]["dropped"]["kind"] == "offline"
        assert all(second[n]["dropped"] is None for n in survivors)

        # back online, the node takes part again (and later tests find three nodes)
        fed.nodes[victim].start()
        wait_for(lambda: exp.requests().nodes().get(victim, None) is not None and exp.requests().nodes()[victim].online,
                 30, f"{victim} presence")  # fmt: skip
        assert exp.run_once() == 1
        third = exp.training_replies()[2]
        assert sorted(third) == sorted(HOSPITALS) and all(v["dropped"] is None for v in third.values()), third
        assert exp.round_current() == 3
