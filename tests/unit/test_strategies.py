"""DefaultStrategy: samples every node with data, drops offline ones, aggregates what arrived."""

from __future__ import annotations

import pytest

from fedsilo.common.errors import RemoteError
from fedsilo.network.messages import DatasetInfo
from fedsilo.researcher.strategies import DefaultStrategy, Drop, RoundFailed, RoundOutcome


def _data(*nodes: str) -> dict[str, DatasetInfo]:
    return {n: DatasetInfo(dataset_id=f"ds-{n}", name=f"d{n}", tags=["t"], data_type="csv") for n in nodes}


def test_samples_all_nodes_and_drops_offline_ones() -> None:
    s = DefaultStrategy()
    sampled, dropped = s.sample_nodes(_data("b", "a", "c"), 0, {"a": True, "b": False})
    assert sampled == ["a", "c"]  # c never announced presence: still asked
    assert list(dropped) == ["b"] and dropped["b"].kind == "offline"
    with pytest.raises(RoundFailed, match="every node is offline"):
        s.sample_nodes(_data("a"), 0, {"a": False})


def test_partial_round_is_accepted_and_recorded() -> None:
    s = DefaultStrategy()
    outcome = RoundOutcome(3, ["a", "b"], ["a"], {"b": Drop("b", "timeout", "no reply within 5s")})
    s.check_round(outcome)
    assert s.history[-1]["dropped"]["b"]["kind"] == "timeout"
    restored = DefaultStrategy()
    restored.load_state(s.state())
    assert restored.history == s.history


def test_all_nodes_failing_raises_the_remote_error() -> None:
    err_a = RemoteError("a", "FS300", "plan abc123 is not approved", "approval")
    err_b = RemoteError("b", "FS300", "plan abc123 is not approved", "approval")
    outcome = RoundOutcome(
        0, ["a", "b"], [], {"a": Drop("a", "error", str(err_a), err_a), "b": Drop("b", "error", str(err_b), err_b)}
    )
    with pytest.raises(RemoteError, match=r"node 'a'.*abc123") as info:
        DefaultStrategy().check_round(outcome)
    assert any("node 'b'" in note for note in info.value.__notes__)


def test_no_reply_at_all_names_each_node() -> None:
    outcome = RoundOutcome(
        1, ["a", "b"], [], {"a": Drop("a", "timeout", "no reply within 5s"), "b": Drop("b", "offline", "went offline")}
    )
    with pytest.raises(RoundFailed, match=r"none of the 2 .*a: no reply within 5s; b: went offline"):
        DefaultStrategy().check_round(outcome)
    with pytest.raises(RoundFailed, match="only 1 of"):
        DefaultStrategy(min_nodes=2).check_round(RoundOutcome(1, ["a", "b"], ["a"], {"b": Drop("b", "timeout", "x")}))
