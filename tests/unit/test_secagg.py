"""Secure aggregation's pure pieces (common/secagg): Shamir sharing, fixed point, masks, and whole rounds of
the node and researcher state machines run in-process, messages passed by hand as the researcher relays them."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsilo.common.secagg import FixedPoint, NodeSession, ResearcherSession, SecaggError, shamir
from fedsilo.common.secagg.config import SecaggConfig
from fedsilo.common.secagg.graph import neighbours
from fedsilo.common.secagg.layout import flat_delta, from_blob, to_blob, unflatten
from fedsilo.common.secagg.masking import prg

SECRET = bytes(range(32))


# ------------------------------------------------------------------------------------------- Shamir
@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), data=st.data())
def test_any_t_shares_rebuild_the_secret(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    shares = shamir.split(secret, n, t)
    chosen = data.draw(st.permutations(shares))[:t]
    assert shamir.combine(chosen, t) == secret


def test_t_minus_1_shares_do_not_rebuild_the_secret() -> None:
    shares = shamir.split(SECRET, 5, 3)
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(SecaggError, match="cannot reconstruct"):
            shamir.combine(subset, 3)
        # interpolating anyway gives a value unrelated to the secret
        assert shamir.interpolate_at_zero(subset) != int.from_bytes(SECRET, "big")


def test_t_minus_1_shares_fit_every_secret() -> None:
    """Perfect secrecy: for 2 shares of a threshold-3 sharing, any other secret has a polynomial through them."""
    s1, s2 = shamir.split(SECRET, 5, 3)[:2]
    other = int.from_bytes(b"\xff" * 32, "big")
    # the line through (0, other), then a quadratic term fitted to pass both shares: solvable for any `other`
    p = shamir.PRIME
    a2 = ((s1.y - other) * pow(s1.x, -1, p) - (s2.y - other) * pow(s2.x, -1, p)) * pow(s1.x - s2.x, -1, p) % p
    a1 = ((s1.y - other) * pow(s1.x, -1, p) - a2 * s1.x) % p
    assert all((other + a1 * s.x + a2 * s.x * s.x) % p == s.y for s in (s1, s2))


def test_a_tampered_share_does_not_rebuild_the_secret() -> None:
    shares = shamir.split(SECRET, 3, 3)
    bad = shamir.Share(shares[0].x, (shares[0].y + 1) % shamir.PRIME)
    with contextlib.suppress(SecaggError):  # out of the 32-byte range: refused outright
        assert shamir.combine([bad, *shares[1:]], 3) != SECRET
    with pytest.raises(SecaggError, match="same point"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(SecaggError):
        shamir.Share.from_bytes(b"\x00" * shamir.SHARE_BYTES)  # x = 0 is the secret's own point


# ---------------------------------------------------------------------------------------- fixed point
@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.lists(st.floats(-8, 8, allow_nan=False), min_size=5, max_size=5), min_size=1, max_size=6),
    weights=st.data(),
    bits=st.integers(8, 40),
)
def test_fixed_point_weighted_mean_within_the_bound(values, weights, bits) -> None:
    fp = FixedPoint(8.0, bits)
    w = [weights.draw(st.integers(1, 10_000)) for _ in values]
    total = np.zeros(5, np.uint64)
    for v, n in zip(values, w, strict=True):
        enc, clipped = fp.encode(np.array(v), n)
        assert clipped == 0
        total += enc
    exact = np.average(np.array(values), axis=0, weights=w)
    assert np.abs(fp.decode(total, sum(w)) - exact).max() <= fp.error_bound + 1e-15 * np.abs(exact).max() + 1e-300


def test_fixed_point_clips_and_refuses_what_would_wrap() -> None:
    fp = FixedPoint(1.0, 16)
    enc, clipped = fp.encode(np.array([3.0, -0.5, -9.0]), 1)
    assert clipped == 2
    assert fp.decode(enc, 1).tolist() == [1.0, -0.5, -1.0]
    with pytest.raises(SecaggError, match="capacity"):
        fp.encode(np.zeros(2), fp.capacity + 1)
    with pytest.raises(SecaggError, match="NaN"):
        fp.encode(np.array([np.nan]), 1)
    with pytest.raises(SecaggError):
        FixedPoint(2.0**30, 40)  # no room left for weights


# ------------------------------------------------------------------------------------- whole rounds
def run_round(
    inputs: dict[str, np.ndarray],
    weights: dict[str, int],
    config: SecaggConfig,
    drop_after_shares: frozenset[str] = frozenset(),
    silent_at_unmask: frozenset[str] = frozenset(),
) -> tuple[np.ndarray, int, ResearcherSession, dict[str, np.ndarray]]:
    """One round as the wire runs it; returns (decoded mean, weight, researcher's session, masked inputs)."""
    parties = sorted(inputs)
    nodes = {p: NodeSession(p, "job", 0, parties, config) for p in parties}
    res = ResearcherSession("job", 0, parties, config)
    for p, node in nodes.items():
        res.add_keys(p, node.public_keys())
    for p, node in nodes.items():
        boxes, commitments = node.share_keys(res.keys)
        res.add_shares(p, boxes, commitments)
    masked = {}
    for p in res.sharers:
        nodes[p].receive_shares(res.boxes_for(p))
        if p in drop_after_shares:
            continue
        enc, _ = res.fixed.encode(inputs[p], weights[p])
        masked[p] = nodes[p].mask(enc)
        res.add_masked(p, masked[p], weights[p])
    survivors, dropped = res.unmask_lists()
    for p in res.sharers:
        if p not in silent_at_unmask:
            res.add_unmask(p, *nodes[p].unmask(survivors, dropped))
    mean, weight = res.result()
    return mean, weight, res, masked


def _inputs(k: int, d: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(seed)
    names = [f"node-{i:02d}" for i in range(k)]
    return {n: rng.normal(0, 1, d) for n in names}, {n: int(rng.integers(1, 500)) for n in names}


def _plain(inputs, weights, among) -> np.ndarray:
    return np.average(np.stack([inputs[n] for n in among]), axis=0, weights=[weights[n] for n in among])


@settings(max_examples=12, deadline=None)
@given(k=st.integers(3, 7), d=st.integers(1, 50), seed=st.integers(0, 2**31), drops=st.integers(0, 2))
def test_aggregate_equals_plain_fedavg_within_the_encoding_error(k, d, seed, drops) -> None:
    inputs, weights = _inputs(k, d, seed)
    t = k // 2 + 1
    dropped = frozenset(sorted(inputs)[: min(drops, k - t)])
    mean, weight, _, _ = run_round(inputs, weights, SecaggConfig(threshold=t), drop_after_shares=dropped)
    survivors = sorted(set(inputs) - dropped)
    assert weight == sum(weights[n] for n in survivors)
    assert np.abs(mean - _plain(inputs, weights, survivors)).max() <= FixedPoint().error_bound + 1e-12


def test_a_node_dropped_after_masking_keys_and_one_silent_at_unmask() -> None:
    """One node never sends its masked input (recovered through its s shares), another sends it and then goes
    silent (its b is rebuilt from its neighbours' shares)."""
    inputs, weights = _inputs(5, 20)
    names = sorted(inputs)
    mean, _, _, _ = run_round(inputs, weights, SecaggConfig(threshold=3), drop_after_shares=frozenset(names[:1]),
                              silent_at_unmask=frozenset(names[1:2]))  # fmt: skip
    assert np.allclose(mean, _plain(inputs, weights, names[1:]), atol=1e-9)


def test_k_regular_graph_secagg_plus() -> None:
    inputs, weights = _inputs(8, 30, seed=3)
    graph = neighbours(sorted(inputs), degree=4)
    assert all(len(v) == 4 for v in graph.values()) and all(a in graph[b] for a in graph for b in graph[a])
    names = sorted(inputs)
    mean, _, _, _ = run_round(inputs, weights, SecaggConfig(threshold=3, degree=4),
                              drop_after_shares=frozenset(names[2:3]))  # fmt: skip
    assert np.allclose(mean, _plain(inputs, weights, names[:2] + names[3:]), atol=1e-9)


def test_a_single_masked_input_looks_uniform_and_uncorrelated() -> None:
    """The researcher's view of one node: its masked words are uniform on 2^64 (KS on the words scaled to
    [0, 1), chi-square on the low byte) and uncorrelated with the node's real update."""
    inputs, weights = _inputs(3, 20_000, seed=5)
    _, _, res, masked = run_round(inputs, weights, SecaggConfig(threshold=2))
    node = sorted(masked)[0]
    words = masked[node]
    unit = words.astype(np.float64) / 2.0**64
    assert stats.kstest(unit, "uniform").pvalue > 1e-3
    low = np.bincount((words & np.uint64(0xFF)).astype(np.int64), minlength=256)
    assert stats.chisquare(low).pvalue > 1e-3
    assert abs(stats.pearsonr(unit, inputs[node]).statistic) < 0.05
    plain, _ = res.fixed.encode(inputs[node], weights[node])  # the unmasked encoding is far from uniform
    assert stats.kstest(plain.astype(np.float64) / 2.0**64, "uniform").pvalue < 1e-10


def test_a_tampered_or_misrouted_encrypted_share_is_refused() -> None:
    config, parties = SecaggConfig(threshold=2), ["a", "b", "c"]
    nodes = {p: NodeSession(p, "job", 0, parties, config) for p in parties}
    keys = {p: n.public_keys() for p, n in nodes.items()}
    boxes = {p: n.share_keys(keys)[0] for p, n in nodes.items()}
    flipped = bytearray(boxes["a"]["b"])
    flipped[20] ^= 1
    with pytest.raises(SecaggError, match="authentication"):
        nodes["b"].receive_shares({"a": bytes(flipped), "c": boxes["c"]["b"]})
    with pytest.raises(SecaggError, match="authentication"):  # a's box for c, relayed to b as if for b
        nodes["b"].receive_shares({"a": boxes["a"]["c"], "c": boxes["c"]["b"]})
    assert nodes["b"].stage == "shares"  # nothing taken from a refused batch
    nodes["b"].receive_shares({"a": boxes["a"]["b"], "c": boxes["c"]["b"]})
    assert nodes["b"].stage == "ready"


def test_a_tampered_revealed_share_is_refused_and_the_sum_still_right() -> None:
    inputs, weights = _inputs(4, 10)
    config, parties = SecaggConfig(threshold=3), sorted(inputs)
    nodes = {p: NodeSession(p, "job", 0, parties, config) for p in parties}
    res = ResearcherSession("job", 0, parties, config)
    for p, n in nodes.items():
        res.add_keys(p, n.public_keys())
    for p, n in nodes.items():
        res.add_shares(p, *n.share_keys(res.keys))
    for p, n in nodes.items():
        n.receive_shares(res.boxes_for(p))
        res.add_masked(p, n.mask(res.fixed.encode(inputs[p], weights[p])[0]), weights[p])
    survivors, dropped = res.unmask_lists()
    b, s = nodes[parties[0]].unmask(survivors, dropped)
    forged = bytearray(b[parties[1]])
    forged[-1] ^= 1
    res.add_unmask(parties[0], {**b, parties[1]: bytes(forged)}, s)
    assert res.refused == [f"{parties[0]}: {parties[1]} (b)"]
    for p in parties[1:3]:
        res.add_unmask(p, *nodes[p].unmask(survivors, dropped))
    assert res.missing() == [f"{parties[1]} (b)"]  # 2 valid shares of a threshold-3 secret
    with pytest.raises(SecaggError, match="too few valid shares"):
        res.result()
    res.add_unmask(parties[3], *nodes[parties[3]].unmask(survivors, dropped))
    assert np.allclose(res.result()[0], _plain(inputs, weights, parties), atol=1e-9)


def test_a_node_answers_each_stage_once_and_never_both_shares_of_a_node() -> None:
    config, parties = SecaggConfig(threshold=2), ["a", "b", "c"]
    nodes = {p: NodeSession(p, "job", 0, parties, config) for p in parties}
    keys = {p: n.public_keys() for p, n in nodes.items()}
    boxes = {p: n.share_keys(keys)[0] for p, n in nodes.items()}
    a = nodes["a"]
    with pytest.raises(SecaggError, match="each stage runs once"):
        a.share_keys(keys)
    with pytest.raises(SecaggError, match="at 'shares'"):
        a.mask(np.zeros(3, np.uint64))
    a.receive_shares({"b": boxes["b"]["a"], "c": boxes["c"]["a"]})
    with pytest.raises(SecaggError, match="only a node that sent its masked input"):
        a.vouch(["a", "b", "c"])
    a.mask(np.zeros(3, np.uint64))
    with pytest.raises(SecaggError, match="each stage runs once"):
        a.mask(np.zeros(3, np.uint64))
    with pytest.raises(SecaggError, match="both surviving and dropped"):
        a.unmask(["a", "b"], ["b"])
    with pytest.raises(SecaggError, match="fewer than threshold"):
        a.unmask(["a"], ["b", "c"])
    with pytest.raises(SecaggError, match="cannot be named dropped"):  # its own s share after it masked
        a.unmask(["b", "c"], ["a"])
    a.vouch(["a", "b", "c"])
    with pytest.raises(SecaggError, match="another survivor list"):
        a.vouch(["a", "b"])
    with pytest.raises(SecaggError, match="differs from the one this node vouched for"):
        a.unmask(["a", "b"], ["c"])
    a.unmask(["a", "b", "c"], [])
    with pytest.raises(SecaggError, match="at 'done'"):  # a second ask (b's s share now) is refused
        a.unmask(["a", "c"], ["b"])


def test_setup_refuses_weak_thresholds_and_foreign_keys() -> None:
    with pytest.raises(SecaggError, match="above half"):
        NodeSession("a", "job", 0, ["a", "b", "c", "d"], SecaggConfig(threshold=2))
    with pytest.raises(SecaggError, match="not among"):
        NodeSession("z", "job", 0, ["a", "b"], SecaggConfig(threshold=2))
    nodes = {p: NodeSession(p, "job", 0, ["a", "b", "c"], SecaggConfig(threshold=2)) for p in "abc"}
    keys = {p: n.public_keys() for p, n in nodes.items()}
    with pytest.raises(SecaggError, match="own keys"):
        nodes["a"].share_keys({**keys, "a": keys["b"]})
    with pytest.raises(SecaggError, match="repeats"):
        nodes["a"].share_keys({**keys, "c": keys["a"]})


def test_prg_and_layout() -> None:
    assert (prg(SECRET, 1000) == prg(SECRET, 1000)).all() and not (prg(SECRET, 10) == prg(bytes(32), 10)).all()
    ref = {"w": torch.zeros(2, 3), "b": torch.zeros(2), "n": torch.tensor(4)}
    upd = {"w": torch.ones(2, 3), "b": torch.full((2,), -2.0), "n": torch.tensor(5)}
    delta = flat_delta(upd, ref)
    assert delta.tolist() == [-2.0, -2.0, 1.0] + [1.0] * 6
    back = unflatten(delta, ref)
    assert back["w"].shape == (2, 3) and back["n"].item() == 1.0
    words = np.array([0, 2**64 - 1, 5, 7, 9, 11, 13, 15, 17], dtype=np.uint64)
    assert (from_blob(to_blob(words, ref), ref) == words).all()
    with pytest.raises(SecaggError, match="expected int64"):
        from_blob({k: torch.from_numpy(v).float() for k, v in to_blob(words, ref).items()}, ref)
    assert (from_blob({k: torch.from_numpy(v) for k, v in to_blob(words, ref).items()}, ref) == words).all()
