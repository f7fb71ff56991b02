"""Personalised layers: a plan's `local_parameters` stay on the node and persist per experiment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedsilo.common.training_plan import TorchTrainingPlan, TrainingPlanError
from fedsilo.node.personal import LOCAL_FILE, LocalLayers


class Personal(TorchTrainingPlan):
    local_parameters = ("head.",)

    def init_model(self, model_args):
        return nn.Sequential()  # replaced below: named submodules make the names readable

    def training_step(self, data, target):
        return self.model()(data).sum()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)


def plan() -> Personal:
    p = Personal()
    p.init_model = lambda model_args: Net()  # type: ignore[method-assign]
    p.post_init({}, {})
    return p


def test_shared_parameters_leave_out_the_local_ones() -> None:
    p = plan()
    assert set(p.shared_parameters()) == {"body.weight", "body.bias"}
    assert set(p.local_state()) == {"head.weight", "head.bias"}
    head = p.local_state()
    p.set_parameters({k: torch.zeros_like(v) for k, v in p.shared_parameters().items()})
    assert all(torch.equal(p.local_state()[k], head[k]) for k in head), "loading shared parameters kept the head"
    assert torch.count_nonzero(p.shared_parameters()["body.weight"]) == 0
    with pytest.raises(TrainingPlanError, match="missing"):
        p.set_parameters({"body.weight": torch.zeros(4, 3)})


def test_the_node_keeps_its_local_layers_between_rounds(tmp_path: Path) -> None:
    first = plan()
    layers = LocalLayers(first, tmp_path / "state")
    assert not layers.restore()  # nothing kept yet: the plan's own initialisation
    trained = {k: v + 1 for k, v in first.get_parameters().items()}
    shared = layers.split(trained)
    assert set(shared) == {"body.weight", "body.bias"}, "a local parameter would have left the node"
    assert not (tmp_path / "state" / LOCAL_FILE).exists(), "kept only once the upload succeeded"
    layers.commit()
    second = plan()  # the next round: a fresh instance
    assert LocalLayers(second, tmp_path / "state").restore()
    assert torch.equal(second.local_state()["head.weight"], trained["head.weight"])
    assert not torch.equal(second.shared_parameters()["body.weight"], trained["body.weight"])


def test_a_plan_without_local_layers_sends_everything(tmp_path: Path) -> None:
    p = plan()
    p.local_parameters = ()
    params = p.get_parameters()
    assert LocalLayers(p, tmp_path).split(params) is params
