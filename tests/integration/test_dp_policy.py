"""Differential privacy the node enforces, on node daemons (processes) over each broker: a weaker DP request is
raised to the node's floor or refused (FS700); epsilon is charged per dataset across researchers, a round that
would pass the dataset's budget is refused naming what is left (FS701); a daemon killed mid-round keeps its
charge, and the same request re-run after the restart is charged once."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedsilo.common.config import read_toml, write_toml
from fedsilo.common.processes import wait_until
from fedsilo.node.budget import PrivacyLedger, compose
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.brokers import BOTH
from tests.support.client import RawResearcher
from tests.support.plans import LOGREG_PLAN
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node
from tests.support.tables import write_sign_csv

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

ROWS = 64
PARAMS = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
ARGS = {"epochs": 1, "batch_size": 16}  # 4 batches: a round is 4 steps at sample rate 1/4
ROUND = {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4}  # what the raising node charges such a round
# Slow enough to be killed while it trains (a step of the other plan takes about a millisecond).
SLOW_PLAN = LOGREG_PLAN.replace("return nn.functional.cross_entropy", "import time; time.sleep(0.5)\n        return "
                                "nn.functional.cross_entropy")  # fmt: skip


@dataclass
class Setup:
    net: NetworkHandle
    r1: RawResearcher
    r2: RawResearcher
    nodes: dict[str, NodeHandle]
    datasets: dict[str, str]


def _node(net: NetworkHandle, root: Path, data: Path, name: str, dp: dict, datasets: tuple[str, ...]) -> Path:
    nodedir = root / name
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", name, "--network", str(net.netdir),
                    "--data-root", str(data), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    config = read_toml(nodedir / "config.toml")
    config.setdefault("dp", {}).update(dp)
    write_toml(nodedir / "config.toml", config)
    for ds in datasets:
        DatasetStore(nodedir).add(ds, ["dp"], "csv", data / "d.csv", added_by="test")
    plans = PlanStore(nodedir)
    for source in (LOGREG_PLAN, SLOW_PLAN):
        plans.approve(plans.submit(source, "HeartPlan", "researcher")["sha256"], by="test", note="test plans")
    return nodedir


@pytest.fixture(scope="module", params=BOTH)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp(f"dp-{request.param}")
    net = start_network(root, broker=request.param)
    data = root / "data"
    data.mkdir()
    write_sign_csv(data / "d.csv", ROWS)
    floor = {"min_noise_multiplier": 1.0, "max_grad_norm": 1.0}
    dirs = {"raising": _node(net, root, data, "raising", floor, ("open", "shared")),
            "refusing": _node(net, root, data, "refusing", {**floor, "weaker_request": "refuse",
                                                             "epsilon_budget": 1000.0}, ("strict",))}  # fmt: skip
    datasets = {ds["name"]: ds["dataset_id"] for d in dirs.values() for ds in DatasetStore(d).list()}
    # Room for exactly two rounds of the raising node's floor: the third is refused.
    two, three = compose([ROUND] * 2, 1e-5), compose([ROUND] * 3, 1e-5)
    out = subprocess.run([*FEDSILO, "node", "dataset", "budget", "--dir", str(dirs["raising"]), "shared",
                          "--epsilon", f"{(two + three) / 2:.6f}"], check=True, capture_output=True, text=True)
    assert f"{datasets['shared']}: epsilon" in out.stdout
    nodes: dict[str, NodeHandle] = {}
    r1 = r2 = None
    try:
        nodes = {name: start_node(d) for name, d in dirs.items()}
        r1, r2 = RawResearcher.for_network(net, "dp-r1"), RawResearcher.for_network(net, "dp-r2")
        yield Setup(net, r1, r2, nodes, datasets)
    finally:
        for who in (r1, r2):
            if who is not None:
                who.close()
        for handle in nodes.values():
            handle.stop()
        net.stop()


def _request(s: Setup, who: RawResearcher, dataset: str, source: str = LOGREG_PLAN, job: str = "job", **args):
    return who.train_request(source, "HeartPlan", s.datasets[dataset], params=PARAMS, job_id=job, **{**ARGS, **args})


def _ledger(s: Setup, node: str) -> PrivacyLedger:
    return PrivacyLedger(s.nodes[node].nodedir, NodeConfig.load(s.nodes[node].nodedir).dp)


def test_a_weaker_request_is_raised_to_the_floor_reported_and_logged(setup: Setup) -> None:
    s = setup
    req = _request(s, s.r1, "open", dp_args={"sigma": 0.3, "clip": 5.0})
    reply = s.r1.ask("raising", req, ("train_reply", "error"))
    assert reply.kind == "train_reply", reply
    cap = reply.applied_caps["dp_args"]
    assert (cap["requested"]["sigma"], cap["requested"]["clip"]) == (0.3, 5.0)
    assert (cap["applied"]["sigma"], cap["applied"]["clip"]) == (1.0, 1.0)
    # the reply's epsilon (the round's own Opacus accountant) is what the ledger charged
    assert reply.metrics["epsilon"] == pytest.approx(reply.applied_caps["privacy_budget"]["epsilon"], rel=1e-9)
    assert reply.applied_caps["privacy_budget"]["applied"] is None  # charged, but this dataset has no budget
    log = (s.nodes["raising"].nodedir / "logs" / "node.log").read_text()
    assert re.search(rf"\[{req.request_id}\] dp_args of dp-r1 raised to the node's policy: sigma 0.3 < 1, clip 5 > 1",
                     log)  # fmt: skip


def test_a_researcher_cannot_choose_the_rate_or_steps_it_is_charged_for(setup: Setup) -> None:
    s = setup
    dp = {"sigma": 1.0, "clip": 1.0, "sample_rate": 1e-6, "max_steps": 1}  # "charge me for one tiny step"
    reply = s.r2.ask("raising", _request(s, s.r2, "open", dp_args=dp), ("train_reply", "error"))
    assert reply.kind == "train_reply", reply
    applied = reply.applied_caps["dp_args"]["applied"]
    assert (applied["sample_rate"], applied["max_steps"]) == (0.25, 4) and reply.metrics["steps"] <= 4
    assert reply.applied_caps["privacy_budget"]["epsilon"] == pytest.approx(compose([ROUND], 1e-5))
    assert reply.metrics["epsilon"] == pytest.approx(compose([ROUND], 1e-5), rel=1e-9)


def test_refuse_mode_refuses_a_weaker_request_and_one_without_dp_charging_nothing(setup: Setup) -> None:
    s = setup
    weak = s.r1.ask("refusing", _request(s, s.r1, "strict", dp_args={"sigma": 0.5, "clip": 1.0}), ("error",))
    assert weak.code == "FS700" and weak.stage == "arguments"
    assert "sigma 0.5 < 1" in weak.message and "sigma >= 1, clip <= 1" in weak.message
    none = s.r1.ask("refusing", _request(s, s.r1, "strict"), ("error",))  # the dataset has a budget: DP needed
    assert none.code == "FS700" and "only with differential privacy" in none.message
    assert _ledger(s, "refusing").charges() == []


def test_two_researchers_share_a_budget_and_the_next_round_is_refused_naming_what_is_left(setup: Setup) -> None:
    s = setup
    first = s.r1.ask("raising", _request(s, s.r1, "shared", job="a"), ("train_reply", "error"))
    second = s.r2.ask("raising", _request(s, s.r2, "shared", job="b"), ("train_reply", "error"))
    assert first.kind == second.kind == "train_reply", (first, second)
    left = second.applied_caps["privacy_budget"]["remaining"]
    assert second.applied_caps["privacy_budget"]["spent"] == pytest.approx(compose([ROUND] * 2, 1e-5))
    third = s.r1.ask("raising", _request(s, s.r1, "shared", job="a"), ("error",))
    assert third.code == "FS701" and third.stage == "privacy_budget"
    assert f"has {left:.4g} epsilon left of its budget" in third.message
    charges = _ledger(s, "raising").charges(s.datasets["shared"])
    assert [(c["researcher"], c["status"]) for c in charges] == [("dp-r1", "spent"), ("dp-r2", "spent")]
    table = subprocess.run([*FEDSILO, "node", "budget", "--dir", str(s.nodes["raising"].nodedir)],
                           check=True, capture_output=True, text=True).stdout  # fmt: skip
    row = next(line for line in table.splitlines() if line.startswith(s.datasets["shared"]))
    assert f"{left:.4g}" in row and "dp-r1: " in row and "dp-r2: " in row and "(1 round)" in row


def test_a_daemon_killed_mid_round_keeps_the_charge_and_the_rerun_is_charged_once(setup: Setup) -> None:
    s = setup
    node = s.nodes["refusing"]
    req = _request(s, s.r2, "strict", SLOW_PLAN, job="slow", dp_args={"sigma": 1.0, "clip": 1.0}, num_updates=4)
    s.r2.send("refusing", req)
    ledger = _ledger(s, "refusing")
    wait_until(lambda: any(c["request_id"] == req.request_id for c in ledger.charges()), node.proc, node.log_path,
               60, "the round's charge")  # fmt: skip
    time.sleep(0.5)  # into training (not timing anything: the charge counts from before the worker started)
    node.stop(signal.SIGKILL)
    [charge] = [c for c in ledger.charges() if c["request_id"] == req.request_id]
    assert charge["status"] == "reserved"
    assert ledger.summary([s.datasets["strict"]])[0]["spent"] == pytest.approx(charge["epsilon"])
    node.start()  # the durable queue runs the request again
    reply = s.r2.wait(req.request_id, ("train_reply", "error"))
    assert reply.kind == "train_reply", reply
    again = [c for c in ledger.charges() if c["request_id"] == req.request_id]
    assert len(again) == 1 and again[0]["status"] == "spent" and again[0]["epsilon"] == charge["epsilon"]
