"""What the loader gets is what the researcher asked, on a node daemon (a process) over each broker.

Batch size shows in the reply's `steps`: one epoch over 96 rows is 2 steps at 48, 3 at 32, 4 at 24.
The node caps `max_batch_size` at 64 and must report it when it lowers something.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedsilo.common.config import read_toml, write_toml
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.brokers import BOTH
from tests.support.client import RawResearcher
from tests.support.plans import LOGREG_PLAN
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py

ROWS, CAP = 96, 64

# Fed-BioMed style: training_data takes no batch size and the DataManager sets none.
FBM_PLAN = LOGREG_PLAN.replace("def training_data(self, batch_size):", "def training_data(self):").replace(
    "DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)",
    "DataManager(CsvDataset(self.dataset_path), shuffle=True)",
)
# The plan's own DataManager fixes its batch size.
FIXED_PLAN = LOGREG_PLAN.replace("batch_size=batch_size, shuffle=True", "batch_size=24, shuffle=True")


@dataclass
class Setup:
    researcher: RawResearcher
    node: NodeHandle
    dataset_id: str


@pytest.fixture(scope="module", params=BOTH)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp(f"loader-{request.param}")
    net: NetworkHandle = start_network(root, broker=request.param)
    data = root / "data"
    data.mkdir()
    x = np.random.default_rng(0).normal(size=(ROWS, 4))
    rows = "".join(",".join(f"{v:.4f}" for v in r) + f",{int(r[0] > 0)}\n" for r in x)
    (data / "d.csv").write_text("a,b,c,d,label\n" + rows)
    nodedir = root / "n1"
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", "n1", "--network", str(net.netdir),
                    "--data-root", str(data), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    config = read_toml(nodedir / "config.toml")
    config.setdefault("limits", {})["max_batch_size"] = CAP
    write_toml(nodedir / "config.toml", config)
    ds = DatasetStore(nodedir).add("d", ["demo"], "csv", data / "d.csv", added_by="test")
    plans = PlanStore(nodedir)
    for source in (FBM_PLAN, FIXED_PLAN, LOGREG_PLAN):
        plans.approve(plans.submit(source, "HeartPlan", "researcher")["sha256"], by="test", note="test plans")
    node = start_node(nodedir)
    researcher = RawResearcher.for_network(net)
    try:
        yield Setup(researcher, node, ds["dataset_id"])
    finally:
        researcher.close()
        node.stop()
        net.stop()


def _round(s: Setup, source: str, kinds: tuple[str, ...] = ("train_reply",), **targs: object):
    params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    args = {"epochs": 1, "batch_size": None, **targs}
    req = s.researcher.train_request(source, "HeartPlan", s.dataset_id, params=params, **args)
    return s.researcher.ask("n1", req, (*kinds, "error"))


def test_fedbiomed_loader_args_batch_size_is_honoured(setup: Setup) -> None:
    reply = _round(setup, FBM_PLAN, loader_args={"batch_size": 48})
    assert reply.kind == "train_reply", reply
    assert reply.metrics["steps"] == 2  # 96 / 48; it was 3 (a silent 32)
    assert reply.applied_caps == {}


def test_the_plans_own_datamanager_batch_size_is_honoured(setup: Setup) -> None:
    reply = _round(setup, FIXED_PLAN)
    assert reply.kind == "train_reply", reply
    assert reply.metrics["steps"] == 4  # 96 / 24; it was 3 (a silent 32)


def test_default_batch_size_when_nobody_sets_one(setup: Setup) -> None:
    assert _round(setup, FBM_PLAN).metrics["steps"] == 3  # 96 / 32


def test_conflicting_batch_sizes_are_refused_naming_the_key(setup: Setup) -> None:
    err = _round(setup, FIXED_PLAN, batch_size=48)
    assert err.kind == "error" and err.code == "FS502" and err.stage == "arguments"
    assert "batch_size=48" in err.message and "batch_size=24" in err.message


def test_node_cap_still_applies_and_is_reported(setup: Setup) -> None:
    reply = _round(setup, LOGREG_PLAN, loader_args={"batch_size": 96})
    assert reply.kind == "train_reply", reply
    assert reply.applied_caps == {"batch_size": {"requested": 96, "applied": CAP}}
    assert reply.metrics["steps"] == 2  # 64 + 32
    capped = _round(setup, FIXED_PLAN)  # under the cap: nothing to report
    assert capped.applied_caps == {}


def test_fedbiomed_key_is_refused_with_the_fedsilo_name(setup: Setup) -> None:
    """Typed on the wire: the SDK cannot even build such a request; a hand-made one is refused on receipt."""
    params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    req = setup.researcher.train_request(LOGREG_PLAN, "HeartPlan", setup.dataset_id, params=params, epochs=1)
    payload = req.to_json().replace(b'"training_args":{', b'"training_args":{"batch_maxnum":5,')
    setup.researcher.send_raw("n1", payload)
    err = setup.researcher.wait(req.request_id, ("error",))
    assert err.code == "FS502" and err.stage == "arguments", err
    assert "num_updates" in err.message and "allowed keys" in err.message
