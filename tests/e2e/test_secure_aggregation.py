"""Secure aggregation end to end (issue 10): three node daemons as processes, on both brokers.

A secure round's global model equals a plain round's (within the fixed-point error); a node killed after the
share stage, or after its masked input arrived, still leaves the right aggregate of the others; a node with
`force_secure_aggregation` refuses a plain round; a hostile researcher with valid credentials cannot make a
node answer a stage twice, mask without a setup, take keys of the researcher's making, or reveal shares for a
survivor list fewer than threshold survivors signed. Measured: 6 minutes per
broker on the shared 2-core machine at load 14 (two plain reference rounds, five secure ones, two node restarts)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedsilo.common.secagg import NodeSession
from fedsilo.common.secagg.config import SecaggConfig
from fedsilo.network.secagg_messages import (
    SecaggKeys,
    SecaggSetupRequest,
    SecaggShareRequest,
    SecaggTask,
    SecaggUnmaskRequest,
)
from fedsilo.node.config import NodeConfig
from fedsilo.researcher import FedAverage
from fedsilo.researcher.algorithms.robust import Krum
from fedsilo.researcher.secagg import SecaggRound, SecureAggregation
from fedsilo.researcher.settings import ExperimentError
from tests.e2e.federation import HOSPITALS, MODEL_ARGS, Approved, Federation, wait_for, zero_params
from tests.support.client import RawResearcher

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

ALL = sorted(HOSPITALS)
ATOL = 1e-6  # float32 results; the encoding's own error is 2^-33


def _global(exp) -> dict[str, torch.Tensor]:
    return exp.aggregated_params()[exp.round_current() - 1]["params"]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=ATOL), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def plain_rounds(fed: Federation, approved: Approved, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One plain FedAvg round from the zero model: over all three nodes, and over the first two only."""
    out = {}
    for key, nodes in (("all", ALL), ("two", ALL[:2])):
        with fed.experiment(tmp_path_factory.mktemp(f"plain-{key}"), round_limit=1, nodes=nodes) as exp:
            exp.run()
            assert all(r["dropped"] is None for r in exp.training_replies()[0].values())
            out[key] = _global(exp)
    return out


def _restart(fed: Federation, name: str, exp) -> None:
    fed.nodes[name].start()
    wait_for(lambda: name in exp.requests().nodes() and exp.requests().nodes()[name].online, 60, f"{name} online")


def test_secure_round_equals_the_plain_round(fed: Federation, approved: Approved, plain_rounds: dict,
                                             tmp_path: Path) -> None:  # fmt: skip
    with fed.experiment(tmp_path, round_limit=1, secure_aggregation=True) as exp:
        exp.run()
        replies = exp.training_replies()[0]
        assert sorted(replies) == ALL and all(r["dropped"] is None for r in replies.values()), replies
        for r in replies.values():  # each node says it masked, with the weight it reported
            assert r["applied_caps"]["secure_aggregation"]["weight"] == r["sample_size"]
        _close(_global(exp), plain_rounds["all"])
        assert exp.round_stats()[0]["secagg_prepare_s"] > 0


def test_node_killed_after_sharing_is_recovered(fed: Federation, approved: Approved, plain_rounds: dict,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """hospital-c shares its keys, then dies before it trains: its pairwise masks are rebuilt from its s shares."""
    victim = ALL[2]
    prepare = SecaggRound.prepare

    def prepare_then_kill(self, drop):
        sharers = prepare(self, drop)
        fed.nodes[victim].stop(signal.SIGKILL)
        return sharers

    monkeypatch.setattr(SecaggRound, "prepare", prepare_then_kill)
    settings = SecureAggregation(stage_timeout=5)
    with fed.experiment(tmp_path, round_limit=1, secure_aggregation=settings, round_timeout=60) as exp:
        try:
            exp.run()
            replies = exp.training_replies()[0]
            # dropped OFFLINE_GRACE_S after the round's requests went out, not at round_timeout (60 s)
            assert replies[victim]["dropped"]["kind"] == "offline", replies[victim]
            _close(_global(exp), plain_rounds["two"])
        finally:
            _restart(fed, victim, exp)


def test_node_killed_after_masking_is_recovered(fed: Federation, approved: Approved, plain_rounds: dict,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """hospital-c's masked input arrives, then it dies before the unmask stage: its self mask is rebuilt from
    the others' b shares, and the aggregate is that of all three."""
    victim = ALL[2]
    finish = SecaggRound.finish

    def kill_then_finish(self, drop):
        fed.nodes[victim].stop(signal.SIGKILL)
        return finish(self, drop)

    monkeypatch.setattr(SecaggRound, "finish", kill_then_finish)
    with fed.experiment(tmp_path, round_limit=1, secure_aggregation=SecureAggregation(stage_timeout=5)) as exp:
        try:
            exp.run()
            assert all(r["dropped"] is None for r in exp.training_replies()[0].values())
            _close(_global(exp), plain_rounds["all"])
        finally:
            _restart(fed, victim, exp)


@pytest.fixture
def forcing_node(fed: Federation) -> Iterator[str]:
    """hospital-a restarted with `[node] force_secure_aggregation = true`, then restored."""
    name = ALL[0]
    cfg = NodeConfig.load(fed.nodedir(name))

    def restart(force: bool) -> None:
        cfg.node.force_secure_aggregation = force
        cfg.save()
        fed.nodes[name].stop()
        fed.nodes[name].start()

    restart(True)
    try:
        yield name
    finally:
        restart(False)


def test_forcing_node_refuses_a_plain_round(fed: Federation, approved: Approved, forcing_node: str,
                                            tmp_path: Path) -> None:  # fmt: skip
    with fed.experiment(tmp_path, round_limit=2) as exp:
        exp.run_once()
        refused = exp.training_replies()[0][forcing_node]["dropped"]
        assert refused["kind"] == "error" and "FS801" in refused["reason"], refused
        assert "secure_aggregation=True" in refused["reason"]
        exp_secure = fed.experiment(tmp_path / "secure", round_limit=1, secure_aggregation=True)
        with exp_secure:
            exp_secure.run()
            assert exp_secure.training_replies()[0][forcing_node]["dropped"] is None


def test_algorithms_that_need_each_update_are_refused(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="Krum needs each node's update"):
        fed.experiment(tmp_path, aggregator=Krum(f=0), secure_aggregation=True)
    with fed.experiment(tmp_path, aggregator=FedAverage(), secure_aggregation=True, round_limit=1) as exp:
        exp.set_aggregator(Krum(f=0))  # changed after construction: refused when the round starts
        with pytest.raises(ExperimentError, match="Krum"):
            exp.run_once()


def test_hostile_researcher_cannot_substitute_keys_replay_or_skip_stages(fed: Federation, approved: Approved,
                                                                          client: RawResearcher) -> None:  # fmt: skip
    """With valid credentials, relaying for the three real nodes: keys of its own making in place of a node's
    (signed or not), a second setup of a round, an unmask without threshold survivors' signatures of its survivor
    list, a second survivor list, and a masked round without any setup are each refused with FS800; a re-sent copy
    gets the same answer."""
    node, config = ALL[1], SecaggConfig(threshold=2)
    common = {"sender": client.party, "job_id": "hostile", "round": 1}  # train_request sends round 1

    def ask(party: str, msg, kind: str):
        return client.ask(party, msg, (kind, "error"), 60)

    setups = {p: SecaggSetupRequest(nodes=ALL, config=config, **common) for p in ALL}
    keys = {p: ask(p, setups[p], "secagg_keys_reply") for p in ALL}
    assert all(k.kind == "secagg_keys_reply" and k.keys.sig for k in keys.values()), keys
    again = ask(node, SecaggSetupRequest(nodes=ALL, config=config, **common), "secagg_keys_reply")
    assert again.kind == "error" and again.code == "FS800" and "already set up" in again.message
    resent = ask(node, setups[node].model_copy(update={"timestamp": setups[node].timestamp + 1}), "secagg_keys_reply")
    assert resent.keys == keys[node].keys

    real = {p: k.keys for p, k in keys.items()}
    mine = NodeSession(ALL[0], "hostile", 1, ALL, config)  # the researcher's own key pair posing as hospital-a
    c, s = mine.public_keys()
    for forged in (SecaggKeys(c=c.hex(), s=s.hex(), sig=real[ALL[0]].sig), SecaggKeys(c=c.hex(), s=s.hex())):
        refused = ask(node, SecaggShareRequest(keys={**real, ALL[0]: forged}, **common), "secagg_shares_reply")
        assert refused.kind == "error" and refused.code == "FS800", refused
        assert "'hospital-a'" in refused.message and ("not signed by it" in refused.message
                                                       or "no signature" in refused.message)  # fmt: skip

    shares = {p: ask(p, SecaggShareRequest(keys=real, **common), "secagg_shares_reply") for p in ALL}
    assert all(r.kind == "secagg_shares_reply" for r in shares.values()), shares
    boxes = {u: shares[u].boxes[node] for u in ALL if u != node}
    train = client.train_request(approved.source, "LogReg", fed.datasets[node], params=zero_params(),
                                 model_args=MODEL_ARGS, job_id="hostile", epochs=1)  # fmt: skip
    reply = ask(node, train.model_copy(update={"secagg": SecaggTask(shares=boxes)}), "train_reply")
    assert reply.kind == "train_reply", reply
    assert reply.applied_caps["secure_aggregation"]["applied"] is True

    # unmasking needs threshold survivors' signatures of the very survivor list; b alone vouches for one list
    listed = {"survivors": ALL[:2], "dropped": [ALL[2]], **common}
    bare = ask(node, SecaggUnmaskRequest(**listed), "secagg_unmask_reply")
    assert bare.kind == "error" and bare.code == "FS800" and "0 valid survivor signature(s)" in bare.message, bare
    vouched = ask(node, SecaggUnmaskRequest(check_only=True, **listed), "secagg_unmask_reply")
    assert vouched.kind == "secagg_unmask_reply" and vouched.consistency and not vouched.b_shares, vouched
    other = ask(node, SecaggUnmaskRequest(check_only=True, survivors=ALL[1:], dropped=[ALL[0]], **common),
                "secagg_unmask_reply")  # fmt: skip
    assert other.kind == "error" and "another survivor list" in other.message, other
    reused = {ALL[0]: vouched.consistency, node: vouched.consistency}  # b's signature passed off as a's too
    short = ask(node, SecaggUnmaskRequest(consistency=reused, **listed), "secagg_unmask_reply")
    assert short.kind == "error" and "1 valid survivor signature(s)" in short.message, short

    orphan = client.train_request(approved.source, "LogReg", fed.datasets[node], params=zero_params(),
                                  model_args=MODEL_ARGS, job_id="never-set-up", epochs=1)  # fmt: skip
    refused = ask(node, orphan.model_copy(update={"secagg": SecaggTask(shares=boxes)}), "train_reply")
    assert refused.kind == "error" and refused.code == "FS800" and "no secure-aggregation setup" in refused.message
