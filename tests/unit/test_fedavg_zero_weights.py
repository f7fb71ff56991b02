"""FedAverage keeps the unweighted sum only for zero-weight updates, with results unchanged."""

from __future__ import annotations

import torch

from fedsilo.researcher.aggregators import FedAverage, NodeUpdate


def test_a_zero_weight_next_to_positive_ones_is_ignored() -> None:
    ref = {"w": torch.zeros(3)}
    mixed = FedAverage().aggregate(
        ref, {"a": ({"w": torch.tensor([1.0, 2.0, 3.0])}, 2), "z": ({"w": torch.full((3,), 100.0)}, 0)}
    )
    assert torch.equal(mixed["w"], torch.tensor([1.0, 2.0, 3.0]))


def test_all_zero_weights_average_every_update_in_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    updates = {f"n{i}": ({"w": torch.randn(20, generator=gen), "n": torch.tensor(i)}, 0) for i in range(4)}
    out = FedAverage().aggregate({"w": torch.zeros(20), "n": torch.tensor(0)}, updates)
    expected = sum(p["w"].double() for p, _ in updates.values()) / 4
    assert torch.equal(out["w"], expected.float())
    assert int(out["n"]) == 2  # 1.5 rounded half to even


def test_no_unweighted_sum_is_kept_when_weights_are_positive() -> None:
    agg = FedAverage()
    agg.start_round(0, {"w": torch.zeros(1000)})
    agg.add(NodeUpdate("a", {"params": {"w": torch.ones(1000)}}, 5))
    assert agg._mean is not None and not agg._mean.holds_unweighted_sum
    agg.add(NodeUpdate("z", {"params": {"w": torch.ones(1000)}}, 0))
    assert agg._mean.holds_unweighted_sum
