"""Each researcher-side algorithm against a numpy computation of its published formula, written here anew.

Inputs are fixed (seeded) float64 models so that the comparisons are tight; float32 and integer buffers are
covered where the algorithm treats them differently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsilo.common.algorithms import FedAvgConfig, FedProxConfig, ScaffoldConfig
from fedsilo.common.errors import ConfigError, FedsiloError
from fedsilo.researcher.algorithms import (
    AggregationError,
    FedAdagrad,
    FedAdam,
    FedAverage,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    NodeUpdate,
    Scaffold,
)

Arrays = dict[str, np.ndarray]
SIZES = {"a": 10, "b": 30, "c": 60, "d": 25, "e": 45}


def _global(rng: np.random.Generator) -> Arrays:
    return {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}


def _locals(rng: np.random.Generator, around: Arrays, nodes: list[str]) -> dict[str, Arrays]:
    return {n: {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in around.items()} for n in nodes}


def _t(arrays: Arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def _run(algo, x: Arrays, local: dict[str, Arrays], round_index: int = 0) -> Arrays:
    algo.start_round(round_index, _t(x))
    for node in local:  # arrival order: as listed
        algo.add(NodeUpdate(node, {"params": _t(local[node])}, SIZES[node]))
    return {k: v.numpy() for k, v in algo.result().items()}


def _weighted_mean(local: dict[str, Arrays], key: str) -> np.ndarray:
    n = np.array([SIZES[i] for i in local], dtype=np.float64)
    return sum(SIZES[i] * local[i][key] for i in local) / n.sum()


def test_fedavg_is_the_sample_weighted_mean() -> None:
    rng = np.random.default_rng(1)
    x = _global(rng)
    local = _locals(rng, x, ["a", "b", "c"])
    out = _run(FedAverage(), x, local)
    for k in x:
        np.testing.assert_allclose(out[k], _weighted_mean(local, k), rtol=1e-14, atol=0)


@pytest.mark.parametrize("mu", [0.0, 0.01, 1.0])
def test_fedprox_server_result_is_fedavgs_and_nodes_get_mu(mu: float) -> None:
    rng = np.random.default_rng(2)
    x = _global(rng)
    local = _locals(rng, x, ["a", "b", "c"])
    prox, avg = _run(FedProx(mu=mu), x, local), _run(FedAverage(), x, local)
    assert all(np.array_equal(prox[k], avg[k]) for k in x)
    tasks = FedProx(mu=mu).configure_train(0, ["a", "b"], _t(x))
    assert {n: t.config for n, t in tasks.items()} == {"a": FedProxConfig(mu=mu), "b": FedProxConfig(mu=mu)}
    assert all(set(t.blobs) == {"params"} for t in tasks.values())
    assert FedAverage().node_config() == FedAvgConfig() and repr(FedProx(mu=mu)) == f"FedProx(mu={mu!r})"


def test_fedprox_refuses_a_negative_or_infinite_mu() -> None:
    for mu in (-0.1, float("inf"), float("nan")):
        with pytest.raises(FedsiloError, match="mu"):
            FedProx(mu=mu)


def _fedopt_reference(kind: str, rounds: list[tuple[Arrays, dict[str, Arrays]]], eta, b1, b2, tau) -> list[Arrays]:
    """Algorithm 2 of Reddi et al. 2021 in numpy: m_-1 = 0, v_-1 = tau^2, no bias correction."""
    m: Arrays = {}
    v: Arrays = {}
    outs = []
    for x, local in rounds:
        out = {}
        for k in x:
            delta = _weighted_mean(local, k) - x[k]
            m[k] = b1 * m.get(k, np.zeros_like(x[k])) + (1 - b1) * delta
            prev = v.get(k, np.full_like(x[k], tau**2))
            if kind == "adagrad":
                v[k] = prev + delta**2
            elif kind == "adam":
                v[k] = b2 * prev + (1 - b2) * delta**2
            else:
                v[k] = prev - (1 - b2) * delta**2 * np.sign(prev - delta**2)
            out[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        outs.append(out)
    return outs


@pytest.mark.parametrize(
    ("cls", "kind"), [(FedAdagrad, "adagrad"), (FedAdam, "adam"), (FedYogi, "yogi")], ids=["adagrad", "adam", "yogi"]
)
def test_fedopt_follows_algorithm_2_over_rounds(cls, kind: str) -> None:
    rng = np.random.default_rng(3)
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-3
    algo = cls(eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    x = _global(rng)
    rounds, outs = [], []
    for r in range(4):  # the moments must carry over: four rounds, each from the previous result
        local = _locals(rng, x, ["a", "b", "c"])
        out = _run(algo, x, local, r)
        rounds.append((x, local))
        outs.append(out)
        x = out
    expected = _fedopt_reference(kind, rounds, eta, b1, b2, tau)
    for got, want in zip(outs, expected, strict=True):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15)


def test_fedopt_defaults_are_the_papers_and_v_starts_at_tau_squared() -> None:
    assert FedAdam().settings() == {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert FedYogi().settings() == {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert FedAdagrad().settings()["eta"] == 1e-1
    # with v_-1 = 0 Yogi's first step would equal Adam's; with v_-1 = tau^2 they differ
    rng = np.random.default_rng(4)
    x = _global(rng)
    local = _locals(rng, x, ["a", "b"])
    adam, yogi = _run(FedAdam(tau=0.05), x, local), _run(FedYogi(tau=0.05), x, local)
    assert not np.allclose(adam["w"], yogi["w"], rtol=1e-9)


def test_fedopt_leaves_integer_buffers_to_the_rounded_mean_and_the_caller_model_untouched() -> None:
    x = {"w": torch.zeros(3, dtype=torch.float32), "n": torch.tensor(0)}
    before = {k: v.clone() for k, v in x.items()}
    algo = FedAdam(eta=0.1)
    algo.start_round(0, x)
    algo.add(NodeUpdate("a", {"params": {"w": torch.ones(3), "n": torch.tensor(3)}}, 1))
    algo.add(NodeUpdate("b", {"params": {"w": torch.ones(3), "n": torch.tensor(4)}}, 1))
    out = algo.result()
    assert int(out["n"]) == 4 and out["n"].dtype == torch.long  # 3.5 rounded half to even
    assert out["w"].dtype == torch.float32
    # delta = 1, m = 0.1, v = 0.99 tau^2 + 0.01: one Adam step of eta * m / (sqrt(v) + tau)
    step = 0.1 * 0.1 / (np.sqrt(0.99e-6 + 0.01) + 1e-3)
    np.testing.assert_allclose(out["w"].numpy(), np.full(3, step, dtype=np.float32), rtol=1e-6)
    assert all(torch.equal(x[k], before[k]) for k in x)
    _, tensors = algo.state()
    assert set(tensors) == {"m.w", "v.w"}


@pytest.mark.parametrize("nodes", [["a", "b", "c"], ["a", "b", "c", "d"]], ids=["odd", "even"])
def test_fedmedian_is_the_coordinatewise_median(nodes: list[str]) -> None:
    rng = np.random.default_rng(5)
    x = _global(rng)
    local = _locals(rng, x, nodes)
    out = _run(FedMedian(), x, local)
    for k in x:
        np.testing.assert_array_equal(out[k], np.median(np.stack([local[n][k] for n in nodes]), axis=0))


@pytest.mark.parametrize(("beta", "cut"), [(0.0, 0), (0.2, 1), (0.45, 2)])
def test_fedtrimmedavg_drops_the_extremes_of_each_coordinate(beta: float, cut: int) -> None:
    rng = np.random.default_rng(6)
    x = _global(rng)
    nodes = list(SIZES)
    local = _locals(rng, x, nodes)
    out = _run(FedTrimmedAvg(beta=beta), x, local)
    for k in x:
        ordered = np.sort(np.stack([local[n][k] for n in nodes]), axis=0)
        np.testing.assert_allclose(out[k], ordered[cut : len(nodes) - cut].mean(axis=0), rtol=1e-14)


def _krum_reference(local: dict[str, Arrays], f: int, m: int) -> tuple[list[str], Arrays]:
    """Blanchard et al. 2017: score(i) = sum of the n - f - 2 smallest ||V_i - V_j||^2, j != i; mean of m best."""
    nodes = sorted(local)
    flat = {n: np.concatenate([local[n][k].ravel() for k in sorted(local[n])]) for n in nodes}
    scores = {}
    for i in nodes:
        dists = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in nodes if j != i)
        scores[i] = sum(dists[: len(nodes) - f - 2])
    best = sorted(nodes, key=lambda n: scores[n])[:m]
    return sorted(best), {k: np.mean([local[n][k] for n in best], axis=0) for k in local[nodes[0]]}


@pytest.mark.parametrize(("f", "m"), [(1, 1), (1, 3), (0, 2)])
def test_krum_and_multikrum_select_by_score(f: int, m: int) -> None:
    rng = np.random.default_rng(7)
    x = _global(rng)
    local = _locals(rng, x, list(SIZES))
    local["d"] = {k: v + 0.5 for k, v in local["d"].items()}  # one outlier, so the choice is not a tie
    algo = Krum(f=f) if m == 1 else MultiKrum(f=f, m=m)
    out = _run(algo, x, local)
    chosen, expected = _krum_reference(local, f, m)
    assert algo.selected == chosen and "d" not in chosen
    for k in x:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-14)


def test_krum_refuses_too_few_updates_and_bad_settings() -> None:
    rng = np.random.default_rng(8)
    x = _global(rng)
    with pytest.raises(AggregationError, match="2f \\+ 3 = 5"):
        _run(Krum(f=1), x, _locals(rng, x, ["a", "b", "c", "d"]))
    with pytest.raises(AggregationError, match="at most K - f"):
        _run(MultiKrum(f=1, m=5), x, _locals(rng, x, list(SIZES)))
    for make in (lambda: Krum(f=-1), lambda: MultiKrum(m=0), lambda: FedTrimmedAvg(beta=0.5), lambda: FedAdam(tau=0)):
        with pytest.raises(ConfigError):
            make()


def _scaffold_round(algo: Scaffold, r: int, x: Arrays, nodes: list[str], sent_to: list[str], rng):
    tasks = algo.configure_train(r, sent_to, _t(x))
    control = {k: v.numpy().copy() for k, v in tasks[sent_to[0]].blobs["control"].items()}
    assert all(t.config == ScaffoldConfig() and set(t.blobs) == {"params", "control"} for t in tasks.values())
    local = _locals(rng, x, nodes)
    deltas = {n: {k: rng.normal(size=v.shape) for k, v in x.items()} for n in nodes}
    algo.start_round(r, _t(x))
    for n in nodes:
        algo.add(NodeUpdate(n, {"params": _t(local[n]), "control_delta": _t(deltas[n])}, SIZES[n]))
    return control, local, deltas, {k: v.numpy() for k, v in algo.result().items()}


def test_scaffold_averages_models_and_moves_c_by_s_over_n_of_the_mean_delta() -> None:
    rng = np.random.default_rng(9)
    algo = Scaffold()
    x = _global(rng)
    c = {k: np.zeros_like(v) for k, v in x.items()}
    for r in range(3):
        # four nodes are sent the task, three answer: |S| / N = 3 / 4
        sent, local, deltas, out = _scaffold_round(algo, r, x, ["a", "b", "c"], ["a", "b", "c", "d"], rng)
        for k in x:
            np.testing.assert_array_equal(sent[k], c[k])  # the server's c as it was before the round
            np.testing.assert_allclose(out[k], _weighted_mean(local, k), rtol=1e-14)
            c[k] = c[k] + (3 / 4) * np.mean([deltas[n][k] for n in deltas], axis=0)
            np.testing.assert_allclose(algo.control[k].numpy(), c[k], rtol=1e-14)
        x = out


def test_scaffold_with_a_set_federation_size_and_a_global_step() -> None:
    rng = np.random.default_rng(10)
    algo = Scaffold(num_nodes=10, eta_g=0.5)
    x = _global(rng)
    _, local, deltas, out = _scaffold_round(algo, 0, x, ["a", "b"], ["a", "b"], rng)
    for k in x:
        np.testing.assert_allclose(out[k], x[k] + 0.5 * (_weighted_mean(local, k) - x[k]), rtol=1e-14)
        np.testing.assert_allclose(algo.control[k].numpy(), (2 / 10) * (deltas["a"][k] + deltas["b"][k]) / 2)


def test_scaffold_refuses_a_missing_or_misshapen_control_delta_without_a_trace() -> None:
    algo = Scaffold()
    x = {"w": torch.zeros(2), "n": torch.tensor(0)}  # the integer buffer has no control variate
    assert set(algo.configure_train(0, ["a", "b"], x)["a"].blobs["control"]) == {"w"}
    algo.start_round(0, x)
    with pytest.raises(AggregationError, match="control_delta"):
        algo.add(NodeUpdate("a", {"params": {"w": torch.full((2,), 1e6), "n": torch.tensor(1)}}, 5))
    params = {"w": torch.ones(2), "n": torch.tensor(1)}
    with pytest.raises(AggregationError, match="shape"):
        algo.add(NodeUpdate("a", {"params": params, "control_delta": {"w": torch.ones(3)}}, 5))
    algo.add(NodeUpdate("b", {"params": params, "control_delta": {"w": torch.ones(2)}}, 5))
    out = algo.result()
    assert torch.equal(out["w"], torch.ones(2)) and algo.contributors == ["b"]
    assert torch.equal(algo.control["w"], torch.full((2,), 0.5))  # |S| / N = 1 / 2 of b's delta


@pytest.mark.parametrize("make", [FedAverage, FedMedian, lambda: FedAdam(), lambda: Scaffold()])
def test_every_algorithm_refuses_a_second_reply_from_a_node_and_a_foreign_model(make) -> None:
    algo = make()
    x = {"w": torch.zeros(2)}
    algo.configure_train(0, ["a"], x)
    algo.start_round(0, x)
    extra = {"control_delta": {"w": torch.zeros(2)}} if isinstance(algo, Scaffold) else {}
    algo.add(NodeUpdate("a", {"params": {"w": torch.ones(2)}, **extra}, 1))
    with pytest.raises(AggregationError, match="already"):
        algo.add(NodeUpdate("a", {"params": {"w": torch.ones(2)}, **extra}, 1))
    with pytest.raises(AggregationError, match="names differ"):
        algo.add(NodeUpdate("b", {"params": {"v": torch.ones(2)}, **extra}, 1))
    with pytest.raises(AggregationError, match="no 'params'"):
        algo.add(NodeUpdate("c", {}, 1))
    # a blob the algorithm does not take is refused (the loop downloads only `reply_blobs`)
    with pytest.raises(AggregationError, match="unexpected blobs \\['junk'\\]"):
        algo.add(NodeUpdate("d", {"params": {"w": torch.ones(2)}, "junk": {"w": torch.ones(2)}, **extra}, 1))
    assert "control_delta" in algo.reply_blobs if isinstance(algo, Scaffold) else algo.reply_blobs == {"params"}
    twin = make()  # the same round with only a's update: the refused ones left no trace
    twin.configure_train(0, ["a"], x)
    twin.start_round(0, x)
    twin.add(NodeUpdate("a", {"params": {"w": torch.ones(2)}, **extra}, 1))
    assert torch.equal(algo.result()["w"], twin.result()["w"])


def test_the_sums_memory_is_reused_only_once_nothing_refers_to_the_last_mean() -> None:
    """WeightedMean's float64 sums come from a pool: a mean still held keeps its memory, a released one's is
    handed out again, zeroed."""
    from fedsilo.researcher.algorithms.fedavg import WeightedMean

    ref = {"w": torch.zeros(1024, 1024)}  # 8 MiB of float64: pooled
    first = WeightedMean(ref)
    first.add("a", {"w": torch.ones(1024, 1024)}, 1)
    kept = first.result()
    second = WeightedMean(ref)
    assert second._weighted["w"].data_ptr() != kept["w"].data_ptr()
    second.add("a", {"w": torch.full((1024, 1024), 2.0)}, 1)
    assert torch.equal(kept["w"], torch.ones(1024, 1024, dtype=torch.float64))  # the second round left it alone
    assert torch.equal(second.result()["w"], torch.full((1024, 1024), 2.0, dtype=torch.float64))
    ptr = kept["w"].data_ptr()
    del kept
    third = WeightedMean(ref)
    assert third._weighted["w"].data_ptr() == ptr and float(third._weighted["w"].abs().sum()) == 0.0
