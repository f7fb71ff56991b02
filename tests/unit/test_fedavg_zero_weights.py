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


def test_updates_larger_than_a_fold_chunk_sum_exactly_as_whole_float64_tensors(monkeypatch) -> None:
    """The fold converts through a small float64 scratch (`FOLD_CHUNK` elements at a time): tensors spanning several
    chunks and a last partial one, a non-contiguous update, half-precision updates and a zero-weight node give the
    sums of whole float64 copies bit for bit."""
    from fedsilo.researcher.algorithms import fedavg

    monkeypatch.setattr(fedavg, "FOLD_CHUNK", 7)
    gen = torch.Generator().manual_seed(3)
    ref = {"w": torch.zeros(5, 6), "b": torch.zeros(3), "h": torch.zeros(10, dtype=torch.float16)}
    updates = [({"w": torch.randn(6, 5, generator=gen).t(), "b": torch.randn(3, generator=gen),
                 "h": torch.randn(10, generator=gen).half()}, weight) for weight in (3, 5, 2)]  # fmt: skip
    mean = fedavg.WeightedMean(ref)
    for i, (params, weight) in enumerate(updates):
        assert not params["w"].is_contiguous()
        mean.add(f"n{i}", params, weight)
    out = mean.result()
    for k in ref:
        expected = sum(p[k].double() * w for p, w in updates) / 10
        assert torch.equal(out[k], expected), k
    zero = fedavg.WeightedMean(ref)
    for i, (params, _) in enumerate(updates):
        zero.add(f"n{i}", params, 0)
    assert torch.equal(zero.result()["w"], sum(p["w"].double() for p, _ in updates) / 3)
