"""FedAverage: sample-weighted mean, float64 running sum, integer buffers, refusals."""

from __future__ import annotations

import pytest
import torch

from fedsilo.researcher.aggregators import AggregationError, FedAverage, NodeUpdate


def _u(node: str, params: dict[str, torch.Tensor], weight: int) -> NodeUpdate:
    return NodeUpdate(node, {"params": params}, weight)


def _ref() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 2), "b": torch.zeros(2), "count": torch.zeros((), dtype=torch.long)}


def test_weighted_mean_by_sample_size() -> None:
    agg = FedAverage()
    agg.start_round(0, _ref())
    agg.add(_u("a", {"w": torch.ones(2, 2), "b": torch.tensor([1.0, 2.0]), "count": torch.tensor(2)}, 1))
    agg.add(_u("b", {"w": torch.full((2, 2), 4.0), "b": torch.tensor([3.0, 6.0]), "count": torch.tensor(4)}, 3))
    out = agg.result()
    assert torch.allclose(out["w"], torch.full((2, 2), 3.25))
    assert torch.allclose(out["b"], torch.tensor([2.5, 5.0]))
    assert out["w"].dtype == torch.float32
    assert out["count"].dtype == torch.long and int(out["count"]) == 4  # 3.5 rounded half to even
    assert agg.contributors == ["a", "b"]


def test_order_does_not_matter_and_accumulates_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = {f"n{i}": ({"w": torch.randn(50, generator=gen)}, i + 1) for i in range(5)}
    ref = {"w": torch.zeros(50)}
    forward = FedAverage().aggregate(ref, updates)
    agg = FedAverage()
    agg.start_round(0, ref)
    for node in reversed(sorted(updates)):
        agg.add(_u(node, *updates[node]))
    assert torch.equal(forward["w"], agg.result()["w"])
    expected = sum(p["w"].double() * w for p, w in updates.values()) / 15
    assert torch.allclose(forward["w"].double(), expected, atol=1e-7)


def test_zero_weights_count_equally() -> None:
    out = FedAverage().aggregate(
        {"w": torch.zeros(1)}, {"a": ({"w": torch.ones(1)}, 0), "b": ({"w": torch.zeros(1)}, 0)}
    )
    assert float(out["w"]) == pytest.approx(0.5)


def test_refusals() -> None:
    agg = FedAverage()
    with pytest.raises(AggregationError, match="start_round"):
        agg.add(_u("a", {"w": torch.ones(1)}, 1))
    agg.start_round(0, {"w": torch.zeros(2)})
    with pytest.raises(AggregationError, match="no node update"):
        agg.result()
    with pytest.raises(AggregationError, match="shape"):
        agg.add(_u("a", {"w": torch.ones(3)}, 1))
    with pytest.raises(AggregationError, match="missing"):
        agg.add(_u("a", {"v": torch.ones(2)}, 1))
    agg.add(_u("a", {"w": torch.ones(2)}, 1))
    with pytest.raises(AggregationError, match="already"):
        agg.add(_u("a", {"w": torch.ones(2)}, 1))
