"""Node-side algorithm hooks in the trainer: FedProx's proximal term and SCAFFOLD's control variates."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from fedsilo.common.algorithms import FedAvgConfig, FedProxConfig, ScaffoldConfig
from fedsilo.common.errors import SerializationError
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.node.algorithms import job_state_dir, make_hooks
from fedsilo.node.algorithms.scaffold import state_path
from fedsilo.node.config import DPPolicy, Limits
from fedsilo.node.trainer import Trainer

X = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # two samples, batch size 1: two steps per epoch


class Linear(TorchTrainingPlan):
    """loss = w . x (no bias): its gradient is x, known exactly, so every update can be written down."""

    def init_model(self, model_args):
        model = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.3, -0.1]]))
        return model

    def training_data(self, batch_size):
        return DataManager(TensorDataset(X, torch.zeros(2)), batch_size=1, shuffle=False)

    def training_step(self, data, target):
        return self.model()(data).sum()


class MLP(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def training_data(self, batch_size):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 4, generator=g)
        return DataManager(TensorDataset(x, (x[:, 1] > 0).long()), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


LR = 0.1


def train(cls, config, state_dir=None, blobs=None, dp=None, **args):
    torch.manual_seed(0)
    plan = cls()
    plan.post_init({}, {"optimizer_args": {"lr": LR}, "random_seed": 3, **args})
    received = plan.get_parameters()
    trainer = Trainer(plan, plan.training_args, Limits(), dp or DPPolicy(), config, make_hooks(config, state_dir))
    result = trainer.train(plan.data_manager().loader(), received, blobs or {})
    return trainer, result, received


@pytest.mark.parametrize("dp", [None, DPPolicy(required=True, sigma=0.7, clip=5.0)], ids=["plain", "dp"])
def test_fedprox_with_mu_zero_is_exactly_fedavg(dp):
    _, avg, _ = train(MLP, FedAvgConfig(), epochs=2, batch_size=8, dp=dp)
    _, prox, _ = train(MLP, FedProxConfig(mu=0.0), epochs=2, batch_size=8, dp=dp)
    for name, value in avg.params.items():
        assert torch.equal(value, prox.params[name]), name  # bit for bit, not approximately


def test_fedprox_term_changes_the_update_as_the_formula_says():
    mu = 2.0
    _, result, received = train(Linear, FedProxConfig(mu=mu), epochs=1)
    w0 = received["weight"]
    x1, x2 = X[0:1], X[1:2]
    w1 = w0 - LR * x1  # step 1: w = w_global, the proximal gradient mu (w - w_global) is zero
    w2 = w1 - LR * (x2 + mu * (w1 - w0))  # step 2: data gradient x2 plus mu (w1 - w_global)
    assert torch.allclose(result.params["weight"], w2, atol=1e-7)
    _, plain, _ = train(Linear, FedAvgConfig(), epochs=1)
    assert torch.allclose(plain.params["weight"], w0 - LR * (x1 + x2), atol=1e-7)
    assert not torch.allclose(plain.params["weight"], w2)


def test_scaffold_corrects_each_step_and_returns_the_control_delta(tmp_path):
    c = {"weight": torch.tensor([[0.5, 0.25]])}
    _, result, received = train(Linear, ScaffoldConfig(), tmp_path, blobs={"control": c}, epochs=1)
    w0 = received["weight"]
    # c_i = 0 the first time: every step's gradient is x + (c - c_i) = x + c
    y = w0 - LR * (X[0:1] + c["weight"]) - LR * (X[1:2] + c["weight"])
    assert torch.allclose(result.params["weight"], y, atol=1e-7)
    c_i_new = 0 - c["weight"] + (w0 - y) / (2 * LR)  # option II with K = 2 steps
    assert torch.allclose(result.extra_blobs["control_delta"]["weight"], c_i_new, atol=1e-6)


def test_scaffold_c_i_persists_across_two_rounds_of_one_job(tmp_path):
    state = job_state_dir(tmp_path / "state", "researcher", "job-1")
    c = {"weight": torch.tensor([[0.5, 0.25]])}
    trainer, first, _ = train(Linear, ScaffoldConfig(), state, blobs={"control": c}, epochs=1)
    assert not state_path(state).exists()  # nothing kept until the update is delivered
    trainer.commit()
    c_i = load_file(str(state_path(state)))["weight"]
    assert torch.allclose(c_i, first.extra_blobs["control_delta"]["weight"])  # c_i was 0: c_i+ = delta

    trainer, second, received = train(Linear, ScaffoldConfig(), state, blobs={"control": c}, epochs=1)
    w0 = received["weight"]
    correction = c["weight"] - c_i  # the second round corrects with the persisted c_i
    y = w0 - LR * (X[0:1] + correction) - LR * (X[1:2] + correction)
    assert torch.allclose(second.params["weight"], y, atol=1e-6)
    trainer.commit()
    c_i2 = load_file(str(state_path(state)))["weight"]
    assert torch.allclose(c_i2, c_i + second.extra_blobs["control_delta"]["weight"], atol=1e-6)

    other = job_state_dir(tmp_path / "state", "researcher", "job-2")  # another job starts from zero
    _, fresh, _ = train(Linear, ScaffoldConfig(), other, blobs={"control": c}, epochs=1)
    assert torch.allclose(fresh.extra_blobs["control_delta"]["weight"], first.extra_blobs["control_delta"]["weight"])


def test_scaffold_refuses_a_control_blob_that_does_not_fit_the_model(tmp_path):
    with pytest.raises(SerializationError, match="shape"):
        train(Linear, ScaffoldConfig(), tmp_path, blobs={"control": {"weight": torch.zeros(3)}}, epochs=1)
    with pytest.raises(SerializationError, match="NaN or infinity"):
        bad = {"weight": torch.tensor([[float("nan"), 0.0]])}
        train(Linear, ScaffoldConfig(), tmp_path, blobs={"control": bad}, epochs=1)


@pytest.mark.parametrize("job", ["..", ".", "a/b", ""])
def test_a_job_id_cannot_name_a_folder_outside_the_state_root(tmp_path, job):
    from fedsilo.common.algorithms import AlgorithmError

    with pytest.raises(AlgorithmError):
        job_state_dir(tmp_path, "researcher", job)
