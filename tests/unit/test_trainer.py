"""The node's trainer: caps, wall-clock budget, DP floor, per-batch policy, sample count, custom loops."""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedsilo.common.plan_source import node_owned_in_source, node_owned_overrides, plan_hash
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan, TrainingPlanError
from fedsilo.node.config import DPPolicy, Limits, NodeSection
from fedsilo.node.privacy import PrivacyViolation
from fedsilo.node.trainer import CustomLoopRefused, Trainer, check_plan_loop
from tests.support.plans import LOGREG_PLAN

N = 48


class Plan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(4, 2)

    def training_data(self, batch_size):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, 4, generator=g)
        return DataManager(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch_size)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


def build(cls: type[TorchTrainingPlan] = Plan, **args) -> TorchTrainingPlan:
    torch.manual_seed(0)
    plan = cls()
    plan.post_init({}, {"batch_size": 8, **args})
    return plan


def run(plan: TorchTrainingPlan, limits: Limits | None = None, dp: DPPolicy | None = None, **kw):
    trainer = Trainer(plan, plan.training_args, limits or Limits(), dp or DPPolicy(), **kw)
    return trainer.train(plan.data_manager().loader(), plan.get_parameters())


def test_epochs_are_capped_by_the_node_and_the_cap_reported():
    result = run(build(epochs=50), Limits(max_epochs=2))
    assert result.metrics["epochs"] == 2 and result.steps == 2 * N // 8
    assert result.applied_caps == {"epochs": {"requested": 50, "applied": 2}}


def test_update_cap_holds_in_epoch_mode_too():
    result = run(build(epochs=5), Limits(max_num_updates=3))
    assert result.steps == 3 and result.applied_caps["num_updates"] == {"requested": None, "applied": 3}


def test_sample_count_is_what_the_node_drew_in_one_epoch():
    assert run(build(epochs=3)).sample_count == N  # three epochs: still N samples, not 3N
    assert run(build(num_updates=2)).sample_count == 16  # stopped inside the first epoch


class LyingLength(Plan):
    """A dataset claiming far more rows than it holds: the sampler would ask for rows that do not exist."""

    def training_data(self, batch_size):
        inner = super().training_data(batch_size).dataset

        class Liar(Dataset):
            def __len__(self):
                return 10**6

            def __getitem__(self, i):
                return inner[i % N]

        return DataManager(Liar(), batch_size=batch_size)


def test_a_dataset_that_lies_about_its_length_does_not_set_the_weight():
    result = run(build(LyingLength, num_updates=3))
    assert result.sample_count == 24  # counted from the batches drawn, not len(dataset)


def test_dp_is_applied_from_the_node_policy_when_the_plan_asks_none():
    plan = build(epochs=1)
    before = plan.get_parameters()
    result = run(plan, dp=DPPolicy(required=True, sigma=1.0, clip=1.0))
    assert result.epsilon is not None and result.epsilon > 0 and result.metrics["epsilon"] == result.epsilon
    assert set(result.params) == set(before)  # plain names, Opacus unwrapped
    assert not torch.equal(result.params["weight"], before["weight"])


def test_dp_floor_wins_over_weaker_researcher_arguments():
    weak = run(build(epochs=1, dp_args={"sigma": 0.3, "clip": 50.0}), dp=DPPolicy(required=True, sigma=2.0, clip=1.0))
    floor = run(build(epochs=1), dp=DPPolicy(required=True, sigma=2.0, clip=1.0))
    assert weak.epsilon == pytest.approx(floor.epsilon)  # the same accountant: sigma 2.0, not 0.3


class WritesWeights(Plan):
    """An approved plan that moves the weights itself in training_step, around the private optimiser."""

    def training_step(self, data, target):
        with torch.no_grad():
            self.model()._module.weight.data.add_(data.mean())  # the plain module, behind Opacus' back
        return super().training_step(data, target)


def test_under_dp_a_plan_writing_the_weights_is_stopped():
    with pytest.raises(PrivacyViolation, match="'weight' changed between two steps"):
        run(build(WritesWeights, epochs=1), dp=DPPolicy(required=True, sigma=1.0, clip=1.0))


class OwnOptimizer(Plan):
    def init_optimizer(self, optimizer_args):
        class Sneaky(torch.optim.SGD):
            pass

        return Sneaky(self.model().parameters(), lr=0.1)


def test_under_dp_a_plan_defined_optimizer_is_refused():
    with pytest.raises(TrainingPlanError, match=re.escape("must be one of torch.optim's, not Sneaky")):
        run(build(OwnOptimizer, epochs=1), dp=DPPolicy(required=True, sigma=1.0, clip=1.0))


class FlakyStep(Plan):
    """training_step raises on its 2nd and 5th call (a batch holding a record it cannot use)."""

    bad_batches = {2, 5}

    def training_step(self, data, target):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in self.bad_batches:
            raise ValueError(f"corrupt record in call {self.calls}")
        return super().training_step(data, target)


def test_bad_batches_are_skipped_and_counted_up_to_the_limit():
    result = run(build(FlakyStep, epochs=1), Limits(max_bad_batches=2))
    assert result.metrics["skipped_batches"] == 2 and result.steps == N // 8 - 2


def test_bad_batch_fails_the_round_by_default_and_past_the_limit():
    with pytest.raises(ValueError, match="corrupt record in call 2"):
        run(build(FlakyStep, epochs=1))
    with pytest.raises(TrainingPlanError, match=re.escape("2 batches failed, more than [limits] max_bad_batches = 1")):
        run(build(FlakyStep, epochs=1), Limits(max_bad_batches=1))


class BadRow(Plan):
    def training_data(self, batch_size):
        inner = super().training_data(batch_size).dataset

        class Broken(Dataset):
            def __len__(self):
                return N

            def __getitem__(self, i):
                if i == 3:
                    raise OSError("unreadable row 3")
                return inner[i]

        return DataManager(Broken(), batch_size=batch_size)


def test_a_batch_that_fails_to_load_is_a_bad_batch_too():
    result = run(build(BadRow, epochs=1), Limits(max_bad_batches=1))
    assert result.metrics["skipped_batches"] == 1 and result.steps == N // 8 - 1


class Slow(Plan):
    def training_step(self, data, target):
        time.sleep(0.02)
        return super().training_step(data, target)


def test_wall_clock_cap_stops_training_after_the_step_that_passes_it():
    result = run(build(Slow, num_updates=10_000), Limits(max_train_seconds=0.1))
    assert 1 <= result.steps < 10_000
    cap = result.applied_caps["max_train_seconds"]
    assert cap["applied"] == 0.1 and cap["stopped_after_step"] == result.steps


class NaNLoss(Plan):
    def training_step(self, data, target):
        return torch.tensor(float("nan"), requires_grad=True)


def test_non_finite_loss_is_not_a_skippable_batch():
    from fedsilo.common.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="at step 1"):
        run(build(NaNLoss, epochs=1), Limits(max_bad_batches=5))


def test_uploaded_parameters_are_those_right_after_training():
    plan = build(epochs=1)
    trainer = Trainer(plan, plan.training_args, Limits(), DPPolicy())
    result = trainer.train(plan.data_manager().loader(), plan.get_parameters())
    with torch.no_grad():
        plan.model().weight.add_(100.0)  # what a testing_step could do afterwards
    assert result.params["weight"].abs().max() < 100.0


def test_get_parameters_copies_unless_told_not_to():
    """`copy=False` (the node's shape check of the received model) reads the live tensors: no 40 MB clone."""
    plan = build(epochs=1)
    live = plan.model().weight.data_ptr()
    assert plan.get_parameters(copy=False)["weight"].data_ptr() == live
    assert plan.shared_parameters(copy=False)["weight"].data_ptr() == live
    assert plan.get_parameters()["weight"].data_ptr() != live


# --------------------------------------------------------------------------------------- custom loops
CUSTOM = LOGREG_PLAN + '''
    def training_routine(self, loader, on_scalar=None):
        return {"steps": 1.0, "loss": 0.5}
'''
SNEAKY = LOGREG_PLAN + "\nHeartPlan.get_parameters = lambda self: {}\n"


def test_source_check_finds_node_owned_methods_without_running_the_plan():
    assert node_owned_in_source(LOGREG_PLAN, "HeartPlan") == []
    assert node_owned_in_source(CUSTOM, "HeartPlan") == ["training_routine"]
    assert node_owned_in_source(SNEAKY, "HeartPlan") == ["get_parameters"]
    mixin = "class Base(TorchTrainingPlan):\n    def testing_routine(self, loader):\n        return {}\n\n"
    assert node_owned_in_source(mixin + LOGREG_PLAN.replace("(TorchTrainingPlan)", "(Base)"), "HeartPlan") == [
        "testing_routine"
    ]


def test_loaded_class_check_sees_attributes_set_after_the_class():
    from fedsilo.common.plan_source import load_plan_class

    assert node_owned_overrides(load_plan_class(LOGREG_PLAN, "HeartPlan")) == []
    assert node_owned_overrides(load_plan_class(SNEAKY, "HeartPlan")) == ["get_parameters"]


def test_custom_loop_refused_by_default_allowed_by_config_never_under_required_dp():
    from fedsilo.common.plan_source import load_plan_class

    cls, sha = load_plan_class(CUSTOM, "HeartPlan"), plan_hash(CUSTOM)
    node = NodeSection(name="n", node_id="n")
    with pytest.raises(CustomLoopRefused, match="overrides the training loop: node caps and DP cannot be enforced"):
        check_plan_loop(cls, sha, node, DPPolicy())
    allowed = NodeSection(name="n", node_id="n", allow_custom_loop=[sha])
    assert check_plan_loop(cls, sha, allowed, DPPolicy()) == ["training_routine"]
    with pytest.raises(CustomLoopRefused, match="requires differential privacy"):
        check_plan_loop(cls, sha, allowed, DPPolicy(required=True, sigma=1.0, clip=1.0))


def test_an_allowed_custom_loop_runs_and_the_reply_says_caps_were_not_enforced():
    class Legacy(Plan):
        def training_routine(self, loader, on_scalar=None):
            return {"steps": 7, "loss": 0.25, "note": "text is dropped"}

    result = run(build(Legacy, epochs=50), Limits(max_epochs=2), custom_loop=["training_routine"])
    assert result.metrics == {"steps": 7.0, "loss": 0.25} and result.sample_count == N
    assert "not enforced" in result.applied_caps["custom_loop"]["applied"]
