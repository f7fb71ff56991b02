"""Run a plan through the node's trainer in-process (unit tests of plans, losses and metrics)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from fedsilo.common.training_plan import TorchTrainingPlan
from fedsilo.node.config import DPPolicy, Limits
from fedsilo.node.trainer import ScalarCallback, Trainer


def trainer_for(plan: TorchTrainingPlan, on_scalar: ScalarCallback | None = None, **limits: Any) -> Trainer:
    """A Trainer with the plan's own training arguments, no DP policy and `limits` (default: none)."""
    return Trainer(plan, plan.training_args, Limits(**limits), DPPolicy(), on_scalar=on_scalar)


def train_metrics(plan: TorchTrainingPlan, loader: DataLoader, on_scalar: ScalarCallback | None = None) -> dict:
    """The metrics of one round of local training from the plan's current parameters."""
    return trainer_for(plan, on_scalar).train(loader, plan.get_parameters()).metrics


def evaluate_metrics(plan: TorchTrainingPlan, loader: DataLoader) -> dict:
    """The plan's `testing_step` metrics as the node computes them."""
    return trainer_for(plan).test(loader)

