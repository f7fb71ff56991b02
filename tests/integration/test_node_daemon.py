"""The node daemon as a separate process against a real network (broker + file store)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.common.serialization import params_from_bytes, params_to_bytes
from fedsilo.network import topics
from fedsilo.network.credentials import Credentials
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.messages import (
    ListRequest,
    Message,
    PingRequest,
    PlanStatusRequest,
    SearchRequest,
    TrainRequest,
    new_id,
)
from fedsilo.network.messaging import Messaging
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore

PLAN_SRC = """
import torch
from torch import nn
from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan


class TinyPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(4, 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)
"""

FEDSILO = [str(Path(sys.executable).parent / "fedsilo")]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.1)


class Researcher:
    """A tiny test publisher with the researcher's credentials."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.m = Messaging(
            f"{creds.party}-test-{new_id()[:6]}",
            creds.mqtt,
            on_message=lambda msg, topic: self.inbox.put(msg),
            subscriptions=[topics.researcher(creds.party)],
            persistent=False,
        )
        self.m.start(timeout=20)
        self.files = FileStoreClient(creds.filestore)

    def send(self, node_id: str, msg: Message) -> None:
        self.m.publish(topics.node(node_id), msg).wait_for_publish(10)

    def wait(self, request_id: str, kinds: tuple[str, ...], timeout: float = 120) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
            if getattr(msg, "in_reply_to", None) == request_id and msg.kind in kinds:
                return msg

    def ask(self, node_id: str, msg: Message, kinds: tuple[str, ...], timeout: float = 120) -> Message:
        self.send(node_id, msg)
        return self.wait(msg.request_id, kinds, timeout)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("net")
    netdir = root / "network"
    proc = subprocess.Popen(
        [
            *FEDSILO,
            "network",
            "start",
            "--dir",
            str(netdir),
            "--mqtt-port",
            "0",
            "--http-port",
            "0",
            "--broker",
            "embedded",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "network.err", "w"),  # noqa: SIM115
    )
    _wait_for(netdir / "state.json", proc)
    yield netdir
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


class Node:
    def __init__(self, nodedir: Path) -> None:
        self.dir = nodedir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.dir / "daemon.err", "a")  # noqa: SIM115
        self.proc = subprocess.Popen([*FEDSILO, "node", "start", "--dir", str(self.dir)], stderr=log,
                                     stdout=subprocess.DEVNULL)  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def setup(net, tmp_path_factory):
    root = tmp_path_factory.mktemp("node")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4))
    y = (x[:, 0] > 0).astype(int)
    (data / "d.csv").write_text(
        "a,b,c,d,label\n" + "".join(",".join(f"{v:.4f}" for v in r) + f",{t}\n" for r, t in zip(x, y, strict=True))
    )
    nodedir = root / "n1"
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", "n1", "--network", str(net),
                    "--data-root", str(data)], check=True)  # fmt: skip
    ds = DatasetStore(nodedir).add("d", ["demo"], "csv", data / "d.csv", added_by="test")
    node = Node(nodedir)
    node.start()
    researcher = Researcher(Credentials.load(net / "credentials" / "researcher.json"))
    # the daemon is ready once it answers a ping
    deadline = time.monotonic() + 90
    while True:
        ping = PingRequest(sender=researcher.creds.party)
        researcher.send("n1", ping)
        try:
            researcher.wait(ping.request_id, ("ping_reply",), timeout=2)
            break
        except queue.Empty:
            assert time.monotonic() < deadline, (nodedir / "daemon.err").read_text()
    yield researcher, node, ds
    node.stop()
    researcher.m.stop()


def _train_request(researcher: Researcher, source: str, dataset_id: str, **targs) -> TrainRequest:
    plan_ref = researcher.files.upload_bytes(source.encode())
    params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    params_ref = researcher.files.upload_bytes(params_to_bytes(params))
    return TrainRequest(sender=researcher.creds.party, job_id="job1", round=1, dataset_id=dataset_id,
                        plan=plan_ref, plan_name="TinyPlan", params=params_ref,
                        training_args={"epochs": 2, "batch_size": 16, "log_interval": 2, **targs})  # fmt: skip


def test_ping_search_list(setup):
    researcher, _, ds = setup
    me = researcher.creds.party
    assert researcher.ask("n1", PingRequest(sender=me), ("ping_reply",)).node_id == "n1"
    found = researcher.ask("n1", SearchRequest(sender=me, tags=["demo"]), ("search_reply",))
    assert [d.dataset_id for d in found.datasets] == [ds["dataset_id"]]
    assert researcher.ask("n1", SearchRequest(sender=me, tags=["nope"]), ("search_reply",)).datasets == []
    listed = researcher.ask("n1", ListRequest(sender=me), ("list_reply",))
    assert "path" not in listed.datasets[0].model_dump()


def test_malformed_and_oversized_answered_daemon_lives(setup):
    researcher, node, _ = setup
    me = researcher.creds.party
    researcher.m.publish_raw(topics.node("n1"), b'{"sender": "' + me.encode() + b'", "request_id": "bad1", "kind": ')
    err = researcher.wait("bad1", ("error",), timeout=30)
    assert err.code == "FS100"
    big = b'{"sender": "' + me.encode() + b'", "request_id": "big1", "pad": "' + b"x" * 300_000 + b'"}'
    researcher.m.publish_raw(topics.node("n1"), big)
    assert researcher.wait("big1", ("error",), timeout=30).code == "FS100"
    assert node.proc.poll() is None
    assert researcher.ask("n1", PingRequest(sender=me), ("ping_reply",)).node_id == "n1"


def test_unknown_dataset(setup):
    researcher, _, _ = setup
    req = _train_request(researcher, PLAN_SRC, "ds_doesnotexist")
    err = researcher.ask("n1", req, ("error",))
    assert err.code == "FS200"


def test_plan_approval_flow_and_training(setup):
    researcher, node, ds = setup
    me = researcher.creds.party
    store = PlanStore(node.dir)
    req = _train_request(researcher, PLAN_SRC, ds["dataset_id"])
    err = researcher.ask("n1", req, ("error",))
    assert err.code == "FS300" and req.plan.sha256 in err.message
    assert store.status(req.plan.sha256) == "pending"
    st = researcher.ask("n1", PlanStatusRequest(sender=me, plan_sha256=req.plan.sha256), ("plan_status_reply",))
    assert st.status == "pending" and st.approval_required

    store.approve(req.plan.sha256, by="test")
    req2 = _train_request(researcher, PLAN_SRC, ds["dataset_id"])
    scalars = []
    researcher.send("n1", req2)
    deadline = time.monotonic() + 120
    while True:
        msg = researcher.inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
        if msg.kind == "scalar" and msg.job_id == "job1":
            scalars.append(msg)
        if getattr(msg, "in_reply_to", None) == req2.request_id and msg.kind in ("train_reply", "error"):
            reply = msg
            break
    assert reply.kind == "train_reply", reply
    assert reply.sample_size == 64 and set(reply.timings) >= {"download_s", "train_s", "upload_s", "total_s"}
    assert "loss" in reply.metrics and scalars
    params = params_from_bytes(researcher.files.download_bytes(reply.params))
    assert not torch.equal(params["weight"], torch.zeros(2, 4))

    changed = PLAN_SRC.replace("nn.Linear(4, 2)", "nn.Linear(4, 2) ")
    err = researcher.ask("n1", _train_request(researcher, changed, ds["dataset_id"]), ("error",))
    assert err.code == "FS300"

    store.revoke(req.plan.sha256, by="test", note="withdrawn")
    err = researcher.ask("n1", _train_request(researcher, PLAN_SRC, ds["dataset_id"]), ("error",))
    assert err.code == "FS301"
    store.approve(req.plan.sha256, by="test")


def test_queued_task_survives_daemon_kill(setup):
    researcher, node, ds = setup
    req = _train_request(researcher, PLAN_SRC, ds["dataset_id"], epochs=400, batch_size=1)
    researcher.send("n1", req)
    researcher.wait(req.request_id, ("task_ack",))
    node.stop(signal.SIGKILL)
    # the worker was a child of the killed daemon; the restarted daemon must run the task again
    node.start()
    reply = researcher.wait(req.request_id, ("train_reply", "error"), timeout=240)
    assert reply.kind == "train_reply", reply
