"""Differential privacy as the node enforces it: the `[dp]` floor, Opacus wrapping, and a guard on the weights.

Why a guard: under DP the only legitimate change to the weights is the private optimiser step. Plan code
runs between two steps (the dataset's `__getitem__`, `training_step`), and an approved plan that wrote to
the weights there (or stepped a second, private-less optimiser it kept) would leak data around the noise.
The guard compares the trainable parameters with a copy taken after the previous step. Measured on the
shared 2-core dev machine (one thread, a check plus a snapshot per step): 0.13 ms for the benchmark's
50 k-parameter MLP, 54 ms for its 10 M one; it runs only under DP, where Opacus' per-sample gradients
already cost several times a plain step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsilo.common.training_plan import TrainingPlanError

from .dp_policy import effective_dp

__all__ = ["PrivacyViolation", "WeightGuard", "drop_activations", "effective_dp", "make_private", "round_epsilon",
           "unwrap"]  # fmt: skip


class PrivacyViolation(TrainingPlanError):
    """Plan code changed the weights outside the private optimiser step."""


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, dp: dict[str, Any]
) -> tuple[nn.Module, Any, DataLoader, Any]:
    """Opacus' (model, optimizer, loader) and its engine (RDP accountant); refuses what DP cannot cover."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    # A plan-defined optimiser class could step with anything; torch's own use the gradients they are given.
    if not type(optimizer).__module__.startswith("torch.optim"):
        raise TrainingPlanError(
            f"under differential privacy the optimizer must be one of torch.optim's, not {type(optimizer).__name__}"
        )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise TrainingPlanError(
            f"model not compatible with differential privacy: {errors[0]} "
            "(replace BatchNorm with GroupNorm in init_model)"
        )
    engine = PrivacyEngine(accountant="rdp")
    rate = dp.get("sample_rate")
    if rate is not None:
        # The node accounted the round at this rate (budget.py): sample at it whatever batch size the plan's
        # DataManager chose, so that what ran is what was charged. 1/rate is a whole number of batches.
        loader = _poisson_loader(loader, rate)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp["sigma"],
        max_grad_norm=dp["clip"],
        poisson_sampling=rate is None,
    )
    return private_model, private_optimizer, private_loader, engine


def _poisson_loader(loader: DataLoader, sample_rate: float) -> DataLoader:
    """The loader's dataset and collation under Poisson sampling at `sample_rate` (Opacus' DPDataLoader, whose
    `from_data_loader` would derive the rate from the plan's batch size instead)."""
    from opacus.data_loader import DPDataLoader

    batches = round(1 / sample_rate)
    dp_loader = DPDataLoader(
        loader.dataset,
        sample_rate=sample_rate,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        generator=loader.generator,
    )
    # Opacus' sampler takes int(1 / rate) steps an epoch, and int(1 / (1 / 93)) is 92 (156,434 of the first 2 M
    # batch counts round down): the epoch would be a step short and its accountant would record 1/92.
    dp_loader.batch_sampler.steps = batches  # type: ignore[union-attr]
    return dp_loader


def round_epsilon(engine: Any, dp: dict[str, Any]) -> float:
    """The round's epsilon from its own accountant at the round's delta; under a budget, first a check that the
    round took no more private steps, at no higher rate, than the node charged it for."""
    limit = dp.get("max_steps")
    if limit is not None:
        steps = sum(n for _, _, n in engine.accountant.history)
        rates = {q for _, q, _ in engine.accountant.history}
        if steps > limit or any(q > dp["sample_rate"] * (1 + 1e-9) for q in rates):
            raise PrivacyViolation(f"the round took {steps} private steps at rates {sorted(rates)}; the node "
                                   f"accounted for {limit} at {dp['sample_rate']:g}")  # fmt: skip
    return float(engine.get_epsilon(dp["delta"]))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module out of Opacus' wrapper, hooks removed."""
    if hasattr(model, "_module"):
        model.remove_hooks()  # type: ignore[operator]
        return model._module  # type: ignore[return-value]
    return model


def drop_activations(model: nn.Module) -> None:
    """Forget what Opacus captured for a batch whose step was abandoned (it would be paired with the next)."""
    for module in model.modules():
        activations = getattr(module, "activations", None)
        if isinstance(activations, list):
            activations.clear()


class WeightGuard:
    """Raises `PrivacyViolation` when the weights changed since `snapshot()` (see the module docstring)."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self._params = params
        self._copy: dict[str, torch.Tensor] = {}
        self.snapshot()

    def snapshot(self) -> None:
        self._copy = {name: p.detach().clone() for name, p in self._params.items()}

    def check(self, where: str) -> None:
        for name, p in self._params.items():
            if not torch.equal(p.detach(), self._copy[name]):
                raise PrivacyViolation(
                    f"parameter '{name}' changed {where}, outside the private optimiser step; the node's "
                    "differential privacy would not cover that change"
                )
