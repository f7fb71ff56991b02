"""`use_gpu`: the researcher asks, the node decides (`[limits] allow_gpu`, then whether torch sees CUDA), and a
round that ran on the CPU although a GPU was asked says why, in the reply's `device` and in a WARNING the
researcher receives. Two node daemons (processes) on each broker: one allows GPUs, one does not. This machine
has no GPU, so the node that allows one falls back to the CPU; the CUDA path runs only where torch sees one."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.plan_source import plan_source
from fedsilo.common.serialization import params_to_bytes
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.messages import BlobRef, EvaluateReply, EvaluateRequest
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.device import NO_CUDA, REFUSED
from fedsilo.node.plans import PlanStore
from fedsilo.node.round import RoundContext, WorkerTask, execute_round
from fedsilo.researcher import Experiment
from tests.support.brokers import BOTH
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network
from tests.support.tables import write_sign_csv

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

TAG = "gpu-choice"
ALLOWS = {"gpu-allowed": True, "gpu-refused": False}
ARGS = {"epochs": 1, "batch_size": 8, "optimizer_args": {"lr": 0.1}, "random_seed": 1}
CPU_ONLY = not torch.cuda.is_available()


class DevicePlan(TorchTrainingPlan):
    """Logistic regression; its test metric says where the model's weights are (1.0 = a CUDA device)."""

    def init_model(self, model_args):
        return nn.Linear(4, 2)

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)

    def testing_step(self, data, target):
        return {"on_cuda": float(next(self.model().parameters()).is_cuda)}


@dataclass
class Setup:
    network: NetworkHandle
    nodes: dict[str, NodeHandle]
    csv: Path


def _csv(path: Path) -> Path:
    return write_sign_csv(path, 32)


@pytest.fixture(scope="module", params=BOTH)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp(f"gpu-{request.param}")
    net = start_network(root, broker=request.param)
    nodes: dict[str, NodeHandle] = {}
    data = root / "data"
    data.mkdir()
    csv = _csv(data / "d.csv")
    try:
        for name, allow in ALLOWS.items():
            nodedir = root / name
            subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", name, "--network",
                            str(net.netdir), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
            cfg = NodeConfig.load(nodedir)
            cfg.limits.allow_gpu = allow
            cfg.save()
            DatasetStore(nodedir).add(f"{name}-csv", [TAG], "csv", csv, added_by="test")
            plans = PlanStore(nodedir)
            plans.approve(plans.submit(plan_source(DevicePlan), "DevicePlan", "researcher")["sha256"], by="dm",
                          note="ok")  # fmt: skip
            nodes[name] = NodeHandle(nodedir=nodedir, log_path=nodedir / "daemon.out")
            nodes[name].start(wait=False)
        for node in nodes.values():
            node.wait_ready()
        yield Setup(net, nodes, csv)
    finally:
        for node in nodes.values():
            node.stop()
        net.stop()


def _round(s: Setup, folder: Path, use_gpu: bool) -> tuple[dict[str, dict], list[str]]:
    with Experiment(tags=[TAG], training_plan_class=DevicePlan, model_args={},
                    training_args={**ARGS, "use_gpu": use_gpu, "test_ratio": 0.25}, round_limit=1,
                    network=s.network.netdir, experimentation_folder=folder, round_timeout=120) as exp:  # fmt: skip
        assert exp.run() == 1
        replies = {v["node_name"]: v for v in exp.training_replies()[0].values()}
        return replies, [f"{m.node_id}: {m.text}" for m in exp.monitor().logs if m.level == "WARNING"]


@pytest.mark.skipif(not CPU_ONLY, reason="this machine has a CUDA device: the node that allows it uses it")
def test_a_gpu_request_falls_back_to_the_cpu_or_is_refused_and_each_reply_says_why(
    setup: Setup, tmp_path: Path
) -> None:
    replies, warnings = _round(setup, tmp_path, use_gpu=True)
    allowed, refused = replies["gpu-allowed"], replies["gpu-refused"]
    assert allowed["dropped"] is None and refused["dropped"] is None  # both trained, on the CPU
    assert allowed["device"] == {"used": "cpu", "gpu_requested": True, "fallback": NO_CUDA}
    assert refused["device"] == {"used": "cpu", "gpu_requested": True, "fallback": REFUSED}
    assert refused["applied_caps"]["use_gpu"] == {"requested": True, "applied": False}
    assert "use_gpu" not in allowed["applied_caps"]
    assert allowed["metrics"]["test_on_cuda"] == refused["metrics"]["test_on_cuda"] == 0.0
    assert any(w.startswith("gpu-allowed") and f"use_gpu: {NO_CUDA}" in w for w in warnings), warnings
    assert any(w.startswith("gpu-refused") and f"use_gpu: {REFUSED}" in w for w in warnings), warnings
    for name, reason in (("gpu-allowed", NO_CUDA), ("gpu-refused", REFUSED)):
        assert reason in (setup.nodes[name].nodedir / "logs" / "node.log").read_text()  # logged on the node


def test_without_a_request_the_round_runs_on_the_cpu_and_nothing_is_reported(setup: Setup, tmp_path: Path) -> None:
    replies, warnings = _round(setup, tmp_path, use_gpu=False)
    for reply in replies.values():
        assert reply["device"] == {"used": "cpu", "gpu_requested": False, "fallback": ""}
        assert "use_gpu" not in reply["applied_caps"]
    assert not [w for w in warnings if "use_gpu" in w]


@pytest.mark.skipif(CPU_ONLY, reason="no CUDA device on this machine: the CUDA path is untested here")
def test_a_node_that_allows_a_gpu_and_has_one_trains_on_it(setup: Setup, tmp_path: Path) -> None:
    replies, _ = _round(setup, tmp_path, use_gpu=True)
    assert replies["gpu-allowed"]["device"]["used"].startswith("cuda")
    assert replies["gpu-allowed"]["metrics"]["test_on_cuda"] == 1.0
    assert replies["gpu-refused"]["device"]["fallback"] == REFUSED


@pytest.mark.parametrize("allow", [True, False], ids=["allowed", "refused"])
def test_an_evaluation_reports_its_device_too(tmp_path: Path, allow: bool) -> None:
    """The worker's half of an EvaluateRequest (in-process) and the reply it becomes."""
    ref = BlobRef(sha256="a" * 64, size=1)
    request = EvaluateRequest(sender="r", job_id="j", round=0, dataset_id="ds", plan=ref, plan_name="DevicePlan",
                              blobs={"params": ref}, training_args={**ARGS, "use_gpu": True})  # fmt: skip
    config = NodeConfig.model_validate({"node": {"name": "n", "node_id": "n"}, "limits": {"allow_gpu": allow}})
    task = WorkerTask(request, plan_source(DevicePlan), request.training_args, {"path": str(_csv(tmp_path / "d.csv"))},
                      {"params": params_to_bytes(nn.Linear(4, 2).state_dict())}, tmp_path)  # fmt: skip
    out = execute_round(task, RoundContext(config), lambda message: None)
    expected = "cuda" if allow and not CPU_ONLY else "cpu"
    assert out.device["used"].startswith(expected) and out.device["gpu_requested"] is True
    assert out.device["fallback"] == ("" if expected == "cuda" else NO_CUDA if allow else REFUSED)
    reply = EvaluateReply.for_request(request, "n", job_id="j", round=0, dataset_id="ds", sample_size=32,
                                      device=out.device)  # fmt: skip
    assert EvaluateReply.model_validate_json(reply.to_json()).device == reply.device
