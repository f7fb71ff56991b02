"""The node's authority over a round, on node daemons (processes) over each broker: its caps, its DP policy and
its trainer hold whatever the plan and the researcher ask; SCAFFOLD's c_i is kept between rounds of a job."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsilo.common.algorithms import AlgorithmSpec, ScaffoldConfig
from fedsilo.common.config import read_toml, write_toml
from fedsilo.common.plan_source import plan_hash
from fedsilo.common.serialization import params_from_bytes, params_to_bytes
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.brokers import BOTH
from tests.support.client import RawResearcher
from tests.support.plans import LOGREG_PLAN
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node
from tests.support.tables import write_sign_csv

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

ROWS = 64
# A plan from the days when the loop was the plan's: it trains as it likes and reports what it likes.
OWN_LOOP = LOGREG_PLAN + '''
    def training_routine(self, loader, on_scalar=None):
        return {"steps": 1.0, "loss": 0.0}
'''
OTHER_OWN_LOOP = OWN_LOOP.replace('"loss": 0.0', '"loss": 1.0')
# FedPer-style: the classifier head (module "2") stays on each node.
PERSONAL = LOGREG_PLAN.replace(
    "return nn.Linear(4, 2)", "return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))"
).replace('    """Logistic regression on the heart CSV."""', '    local_parameters = ("2.",)')
PARAMS = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}


@dataclass
class Setup:
    researcher: RawResearcher
    nodes: dict[str, NodeHandle]
    dirs: dict[str, Path]
    datasets: dict[str, str]


def _node(net: NetworkHandle, root: Path, data: Path, name: str, extra: dict) -> tuple[Path, str]:
    nodedir = root / name
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", name, "--network", str(net.netdir),
                    "--data-root", str(data), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    config = read_toml(nodedir / "config.toml")
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    write_toml(nodedir / "config.toml", config)
    ds = DatasetStore(nodedir).add("d", ["demo"], "csv", data / "d.csv", added_by="test")
    plans = PlanStore(nodedir)
    # approved: what is tested is the trainer, not approval
    for source in (LOGREG_PLAN, OWN_LOOP, OTHER_OWN_LOOP, PERSONAL):
        plans.approve(plans.submit(source, "HeartPlan", "researcher")["sha256"], by="test", note="test plans")
    return nodedir, ds["dataset_id"]


@pytest.fixture(scope="module", params=BOTH)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp(f"authority-{request.param}")
    net = start_network(root, broker=request.param)
    data = root / "data"
    data.mkdir()
    write_sign_csv(data / "d.csv", ROWS)
    configs = {
        "capped": {"limits": {"max_epochs": 2}, "node": {"allow_custom_loop": [plan_hash(OWN_LOOP)]}},
        "private": {"dp": {"required": True, "sigma": 1.0, "clip": 1.0},
                    "node": {"allow_custom_loop": [plan_hash(OWN_LOOP)]}},
    }
    dirs, datasets, nodes = {}, {}, {}
    researcher = None
    try:
        for name, extra in configs.items():
            dirs[name], datasets[name] = _node(net, root, data, name, extra)
            nodes[name] = start_node(dirs[name])
        researcher = RawResearcher.for_network(net)
        yield Setup(researcher, nodes, dirs, datasets)
    finally:
        if researcher is not None:
            researcher.close()
        for handle in nodes.values():
            handle.stop()
        net.stop()


def _round(s: Setup, node: str, source: str = LOGREG_PLAN, job_id: str = "job1", **targs: object):
    req = s.researcher.train_request(source, "HeartPlan", s.datasets[node], params=PARAMS, job_id=job_id,
                                     **{"epochs": 1, "batch_size": 16, **targs})  # fmt: skip
    return s.researcher.ask(node, req, ("train_reply", "error"))


def test_a_plan_asking_50_epochs_on_a_node_capped_at_2_trains_2(setup: Setup) -> None:
    reply = _round(setup, "capped", epochs=50)
    assert reply.kind == "train_reply", reply
    assert reply.metrics["epochs"] == 2 and reply.metrics["steps"] == 2 * ROWS // 16
    assert reply.applied_caps["epochs"] == {"requested": 50, "applied": 2}
    assert reply.sample_size == ROWS  # the node's own count of the training split, not 50 x 64


def test_dp_required_trains_with_dp_whatever_the_plan_asks_and_reports_epsilon(setup: Setup) -> None:
    reply = _round(setup, "private")
    assert reply.kind == "train_reply", reply
    assert reply.metrics["epsilon"] > 0
    assert reply.applied_caps["dp_args"]["applied"]["sigma"] == 1.0


def test_a_plan_with_its_own_loop_is_refused_by_default(setup: Setup) -> None:
    err = _round(setup, "capped", OTHER_OWN_LOOP)
    assert err.kind == "error" and err.code == "FS304" and err.stage == "plan_check"
    assert "overrides the training loop: node caps and DP cannot be enforced" in err.message


def test_a_plan_with_its_own_loop_runs_where_allowed_and_the_reply_says_caps_were_not_enforced(setup: Setup) -> None:
    reply = _round(setup, "capped", OWN_LOOP, epochs=50)
    assert reply.kind == "train_reply", reply
    assert "not enforced" in reply.applied_caps["custom_loop"]["applied"]


def test_a_plan_with_its_own_loop_is_refused_under_required_dp_even_when_allowed(setup: Setup) -> None:
    err = _round(setup, "private", OWN_LOOP)
    assert err.kind == "error" and err.code == "FS304" and "requires differential privacy" in err.message


def test_scaffold_c_i_persists_across_two_rounds_of_one_job(setup: Setup) -> None:
    s, node = setup, "capped"
    control = {"weight": torch.full((2, 4), 0.1), "bias": torch.zeros(2)}
    control_ref = s.researcher.files.upload_bytes(params_to_bytes(control), readers=[node])
    state = s.dirs[node] / "state" / s.researcher.party / "scaffold-job" / "scaffold.safetensors"
    deltas = []
    for rnd in (1, 2):
        req = s.researcher.train_request(LOGREG_PLAN, "HeartPlan", s.datasets[node], params=PARAMS,
                                         job_id="scaffold-job", epochs=1, batch_size=16)  # fmt: skip
        req = req.model_copy(update={"round": rnd, "blobs": {**req.blobs, "control": control_ref},
                                     "algorithm": AlgorithmSpec.of(ScaffoldConfig())})  # fmt: skip
        reply = s.researcher.ask(node, req, ("train_reply", "error"))
        assert reply.kind == "train_reply", reply
        deltas.append(params_from_bytes(s.researcher.files.download_bytes(reply.blobs["control_delta"])))
        kept = load_file(str(state))
        expected = {k: sum(d[k] for d in deltas) for k in deltas[0]}  # c_i starts at 0 and moves by each delta
        assert all(torch.allclose(kept[k], expected[k], atol=1e-6) for k in kept)
    # Round 2 started from the same global model but with c_i of round 1: its correction differs.
    assert not torch.allclose(deltas[0]["weight"], deltas[1]["weight"])


def test_personalised_layers_never_leave_the_node_and_persist_per_job(setup: Setup) -> None:
    s, node = setup, "capped"
    gen = torch.Generator().manual_seed(0)
    shared = {"0.weight": torch.randn(8, 4, generator=gen), "0.bias": torch.rand(8, generator=gen)}
    state = s.dirs[node] / "state" / s.researcher.party / "personal-job" / "local.safetensors"
    heads = []
    for rnd in (1, 2):
        req = s.researcher.train_request(PERSONAL, "HeartPlan", s.datasets[node], params=shared, job_id="personal-job",
                                         epochs=1, batch_size=16)  # fmt: skip
        reply = s.researcher.ask(node, req.model_copy(update={"round": rnd}), ("train_reply", "error"))
        assert reply.kind == "train_reply", reply
        sent = params_from_bytes(s.researcher.files.download_bytes(reply.params))
        assert set(sent) == {"0.weight", "0.bias"}, "a personalised layer left the node"
        heads.append(load_file(str(state)))
        assert set(heads[-1]) == {"2.weight", "2.bias"}
    # round 2 trained the head kept from round 1 further (a fresh head would not be round 1's plus training)
    assert not torch.equal(heads[0]["2.weight"], heads[1]["2.weight"])
