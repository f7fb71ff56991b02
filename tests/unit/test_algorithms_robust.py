"""A node with valid credentials sends a scaled (x1e6) or random model: the robust rules keep the global model
near the honest nodes' mean, FedAvg does not."""

from __future__ import annotations

import pytest
import torch

from fedsilo.researcher.algorithms import (
    FedAlgorithm,
    FedAverage,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    NodeUpdate,
)

HONEST = ["n0", "n1", "n2", "n3", "n4", "n5"]


def _models(attack: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(11)
    x = {"w": torch.randn(8, 16, generator=gen), "b": torch.randn(16, generator=gen)}
    models = {n: {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in x.items()} for n in HONEST}
    if attack == "scaled":
        bad = {k: v * 1e6 for k, v in models["n0"].items()}
    else:
        bad = {k: 100.0 * torch.randn(v.shape, generator=gen) for k, v in x.items()}
    models["evil"] = bad
    return x, models


def _error(algo: FedAlgorithm, attack: str) -> float:
    """Largest distance of any coordinate of the result from the honest nodes' mean."""
    x, models = _models(attack)
    algo.start_round(0, x)
    for node, params in models.items():
        # the attacker also claims many samples: a weight is a number it chooses
        algo.add(NodeUpdate(node, {"params": params}, 10_000 if node == "evil" else 100))
    out = algo.result()
    honest = {k: torch.stack([models[n][k] for n in HONEST]).mean(dim=0) for k in x}
    return max(float((out[k] - honest[k]).abs().max()) for k in x)


@pytest.mark.parametrize("attack", ["scaled", "random"])
@pytest.mark.parametrize(
    "make",
    [FedMedian, lambda: FedTrimmedAvg(beta=0.2), lambda: Krum(f=1), lambda: MultiKrum(f=1, m=4)],
    ids=["median", "trimmed", "krum", "multikrum"],
)
def test_robust_rules_keep_the_model_near_the_honest_mean(make, attack: str) -> None:
    # honest models spread 0.05 around x: their mean is within ~0.1 of any one of them
    assert _error(make(), attack) < 0.2


@pytest.mark.parametrize("attack", ["scaled", "random"])
def test_fedavg_is_carried_away(attack: str) -> None:
    assert _error(FedAverage(), attack) > 10.0


def test_krum_never_selects_the_attacker() -> None:
    for attack in ("scaled", "random"):
        algo = MultiKrum(f=1, m=4)
        _error(algo, attack)
        assert "evil" not in algo.selected and len(algo.selected) == 4
