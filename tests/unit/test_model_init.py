"""The node builds the plan's model without its initialisers only where the received model replaces all of it
(node/model_init.py); anywhere else the model, and the random state after it, are those of a usual build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedsilo.common.errors import ErrorCode
from fedsilo.common.serialization import params_to_bytes
from fedsilo.network.messages import BlobRef, TrainRequest
from fedsilo.node.config import NodeConfig
from fedsilo.node.model_init import build_replacing, replaced_by, zero_initialisers
from fedsilo.node.personal import LOCAL_FILE
from fedsilo.node.round import RoundContext, WorkerTask, execute_round
from fedsilo.node.stages import RoundFailure
from tests.support.tables import write_sign_csv


def layers() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Conv1d(1, 2, 3), nn.Embedding(5, 4), nn.LSTM(4, 3),
                         nn.BatchNorm1d(8))  # fmt: skip


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_initialisers_fill_zeros_inside_the_block_and_are_themselves_after_it_however_it_ends() -> None:
    originals = {name: getattr(nn.init, name) for name in ("kaiming_uniform_", "uniform_", "xavier_uniform_")}
    with zero_initialisers():
        model = layers()
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())
    with pytest.raises(ZeroDivisionError), zero_initialisers():
        1 / 0  # noqa: B018
    assert {name: getattr(nn.init, name) for name in originals} == originals
    assert torch.count_nonzero(nn.Linear(6, 8).weight) > 0


def test_a_fully_received_model_is_kept_and_its_initialisers_drew_nothing() -> None:
    received = layers().state_dict()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    model, kept = build_replacing(layers, lambda m: m, received.keys())
    assert kept
    assert torch.equal(torch.get_rng_state(), before), "no random number was drawn"
    model.load_state_dict(received)
    assert same(model, _loaded(received))


def _loaded(state: dict) -> nn.Module:
    model = layers()
    model.load_state_dict(state)
    return model


class WithTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("table", torch.rand(3), persistent=False)  # never received


@pytest.mark.parametrize(("build", "received"), [
    (layers, [k for k in layers().state_dict() if not k.startswith("5.")]),  # a local layer: not received
    (WithTable, ["fc.weight", "fc.bias"]),                                      # a buffer outside the state dict
], ids=["local-layer", "non-persistent-buffer"])  # fmt: skip
def test_otherwise_the_model_and_the_random_state_after_it_are_a_usual_builds(build, received) -> None:
    torch.manual_seed(7)
    np.random.seed(7)
    usual = build()
    after = torch.get_rng_state(), np.random.get_state()[1].copy()
    torch.manual_seed(7)
    np.random.seed(7)
    model, kept = build_replacing(build, lambda m: m, received)
    assert not kept
    assert same(model, usual)
    assert torch.equal(torch.get_rng_state(), after[0]) and np.array_equal(np.random.get_state()[1], after[1])


def test_a_plan_that_fails_without_its_initialisers_is_built_as_usual() -> None:
    def fussy() -> nn.Module:
        model = nn.Linear(3, 3)
        if torch.count_nonzero(model.weight) == 0:
            raise ValueError("this plan checks its initial weights")
        return model

    torch.manual_seed(3)
    usual = fussy()
    torch.manual_seed(3)
    model, kept = build_replacing(fussy, lambda m: m, ["weight", "bias"])
    assert not kept and same(model, usual)


def test_replaced_by_needs_every_entry_of_the_state_dict() -> None:
    model = nn.BatchNorm1d(3)  # running statistics and a counter: buffers in the state dict
    names = list(model.state_dict())
    assert replaced_by(model, names) and replaced_by(model, [*names, "extra"])
    assert not replaced_by(model, names[:-1])


PLAN = """
import torch
from torch import nn
from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan


class Personal(TorchTrainingPlan):
    local_parameters = ("head.",)

    def init_model(self, model_args):
        torch.manual_seed(11)
        return nn.ModuleDict({"body": nn.Linear(4, 4), "head": nn.Linear(4, 2)})

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path, target="label"), batch_size=batch_size)

    def training_step(self, data, target):
        model = self.model()
        return nn.functional.cross_entropy(model["head"](model["body"](data)), target)
"""


def test_a_rounds_local_layer_starts_from_the_plans_own_initialisation(tmp_path: Path) -> None:
    """The first round of a plan with personalised layers: the head is not received, so the node builds the
    model as usual and the head starts from what the plan's seeded `init_model` draws, not from zeros."""
    csv = write_sign_csv(tmp_path / "d.csv", 40, seed=3)
    ref = BlobRef(sha256="a" * 64, size=1)
    request = TrainRequest(sender="r", job_id="j", round=0, dataset_id="ds", plan=ref, plan_name="Personal",
                           blobs={"params": ref}, training_args={"batch_size": 20, "num_updates": 1})  # fmt: skip
    received = {"body.weight": torch.zeros(4, 4), "body.bias": torch.zeros(4)}
    task = WorkerTask(request, PLAN, request.training_args, {"path": str(csv), "dataset_id": "ds", "shape": [40, 5]},
                      {"params": params_to_bytes(received)}, tmp_path / "state")  # fmt: skip
    config = NodeConfig.model_validate({"node": {"name": "n", "node_id": "n"}})
    execute_round(task, RoundContext(config), lambda message: None)
    torch.manual_seed(11)
    nn.Linear(4, 4)
    expected = nn.Linear(4, 2).weight
    kept = load_file(str(tmp_path / "state" / LOCAL_FILE))
    # the body is received as zeros, so the head's input and its weight's gradient are zero: the trained head's
    # weight is still the plan's seeded initialisation (zeros if the initialisers had been skipped)
    assert torch.count_nonzero(expected) > 0 and torch.equal(kept["head.weight"], expected.detach())


@pytest.mark.parametrize("received", [
    {"body.weight": torch.zeros(4, 5), "body.bias": torch.zeros(4), "head.weight": torch.zeros(2, 4),
     "head.bias": torch.zeros(2)},                                                     # every name, a wrong shape
    {"body.weight": torch.zeros(4, 4), "body.bias": torch.zeros(4), "head.weight": torch.zeros(2, 4),
     "head.bias": torch.zeros(2), "extra": torch.zeros(1)},                           # every name, and one more
], ids=["wrong-shape", "extra-name"])  # fmt: skip
def test_a_received_model_that_names_everything_but_does_not_fit_is_refused_as_before(tmp_path: Path, received) -> None:
    """A hostile researcher's blob that names the whole state dict (so the initialisers are skipped) but does not
    fit the model fails the round at `params`, as it did when the model was built as usual."""
    csv = write_sign_csv(tmp_path / "d.csv", 40, seed=3)
    ref = BlobRef(sha256="a" * 64, size=1)
    request = TrainRequest(sender="r", job_id="j", round=0, dataset_id="ds", plan=ref, plan_name="Personal",
                           blobs={"params": ref}, training_args={"batch_size": 20})  # fmt: skip
    source = PLAN.replace('local_parameters = ("head.",)', "local_parameters = ()")
    task = WorkerTask(request, source, request.training_args, {"path": str(csv), "dataset_id": "ds", "shape": [40, 5]},
                      {"params": params_to_bytes(received)}, tmp_path / "state")  # fmt: skip
    config = NodeConfig.model_validate({"node": {"name": "n", "node_id": "n"}})
    with pytest.raises(RoundFailure) as failed:
        execute_round(task, RoundContext(config), lambda message: None)
    assert (failed.value.code, failed.value.stage) == (ErrorCode.PARAMS_INVALID, "params")
