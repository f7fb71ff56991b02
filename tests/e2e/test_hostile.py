"""Hostile parties with valid credentials against live node daemons and a live researcher, on each
broker: lies about identity, replays, re-sent requests, and a few hundred fuzzed payloads, after which
every party must still answer and a round must still run with every node."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.network import topics
from fedsilo.network.messages import PingRequest, TrainRequest
from fedsilo.network.messaging import Messaging
from fedsilo.node.audit import AuditLog
from tests.e2e.federation import HOSPITALS, MODEL_ARGS, Approved, Federation, zero_params
from tests.support.client import RawResearcher

DEEP = b"[" * 20000 + b"]" * 20000


@pytest.fixture(scope="module")
def mallory(fed: Federation) -> Iterator[Messaging]:
    """A node party of the network that no daemon runs: it may publish on researcher topics as itself."""
    name = "mallory"
    if not fed.network.credentials_path(name).is_file():
        fed.network.add_party(name, "node")
    m = Messaging(name, fed.network.credentials(name).mqtt, on_message=lambda *_: None)
    m.start(timeout=20)
    yield m
    m.stop()


def payloads() -> st.SearchStrategy[bytes]:
    """Random and adversarial payloads: junk bytes, deep nesting, huge numbers, wrong kinds, missing fields."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                               inner, max_size=4),
                         max_leaves=30)  # fmt: skip
    kinds = ["ping_request", "search_request", "train_request", "approval_request", "train_reply", "task_ack",
             "error", "presence", "scalar", "log", "bogus"]  # fmt: skip
    shaped = st.fixed_dictionaries(
        {"kind": st.sampled_from(kinds)},
        optional={
            "sender": st.sampled_from(["researcher", "raw-researcher", "hospital-a", "", "x" * 300]),
            "request_id": st.text(max_size=40),
            "node_id": st.sampled_from(sorted(HOSPITALS)),
            "in_reply_to": st.text(max_size=10),
            "timestamp": st.one_of(st.floats(allow_nan=True), st.integers(min_value=-(10**30), max_value=10**30)),
            "round": st.integers(min_value=-(10**20), max_value=10**20),
            "tags": trees,
            "sample_size": st.integers(min_value=-(10**20), max_value=10**20),
            "params": trees,
        },
    )
    return st.one_of(
        st.binary(max_size=3000),
        trees.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        shaped.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.integers(min_value=17, max_value=30000).map(lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}"),
        st.binary(min_size=1, max_size=8).map(lambda b: b"\xff\xfe" + b + b'{"kind": "ping_request"}'),
        st.integers(min_value=262_145, max_value=300_000).map(lambda n: b"x" * n),
    )


def test_a_request_under_another_researchers_name_is_refused_and_audited(
    fed: Federation, client: RawResearcher
) -> None:
    name = "hospital-b"
    lie = PingRequest(sender="researcher")  # published with raw-researcher's credentials
    client.send(name, lie)
    err = client.wait(lie.request_id, ("error",), timeout=30)
    assert err.code == "FS102" and "raw-researcher" in err.message, err
    audit = AuditLog(fed.nodedir(name)).list(event="request_refused")
    mine = [e for e in audit if e["details"]["request_id"] == lie.request_id]
    assert mine and mine[0]["actor"] == f"researcher:{client.party}", audit


def test_replayed_and_future_requests_are_refused(fed: Federation, approved: Approved, client: RawResearcher) -> None:
    name = "hospital-c"
    fresh = client.train_request(approved.source, "LogReg", fed.datasets[name], params=zero_params(),
                                 model_args=MODEL_ARGS)  # fmt: skip
    day_old = fresh.model_copy(update={"request_id": "replay-1", "timestamp": time.time() - 86400})
    future = fresh.model_copy(update={"request_id": "future-1", "timestamp": time.time() + 3600})
    for msg in (day_old, future):
        client.send(name, msg)
        err = client.wait(msg.request_id, ("error", "task_ack", "train_reply"), timeout=30)
        assert err.kind == "error" and err.code == "FS103", err


def test_a_re_sent_request_gets_its_answer_again(fed: Federation, approved: Approved, client: RawResearcher) -> None:
    """What a researcher does after a broker restart: the node answers a known request id with its state."""
    name = "hospital-a"
    req = client.train_request(approved.source, "LogReg", fed.datasets[name], params=zero_params(),
                               model_args=MODEL_ARGS)  # fmt: skip
    first = client.ask(name, req, ("train_reply",), timeout=120)
    again = client.ask(name, req.model_copy(update={"timestamp": time.time()}), ("train_reply",), timeout=30)
    assert again.params == first.params and again.in_reply_to == req.request_id
    # a copy stamped earlier than one accepted is a replay: refused (audited, not answered), nothing runs again
    stale = req.model_copy(update={"timestamp": time.time() - 86400})
    client.send(name, stale)
    assert client.ping(name).node_id == name  # the node answers one researcher in order: a barrier
    assert [m for m in client.received(req.request_id) if m.kind != "task_ack"] == []
    refused = AuditLog(fed.nodedir(name)).list(event="request_refused")
    assert any(e["details"]["request_id"] == req.request_id and e["details"]["reason"].startswith("replay")
               for e in refused)  # fmt: skip


def test_deep_json_silences_neither_a_node_nor_the_researcher(
    fed: Federation, approved: Approved, client: RawResearcher, mallory: Messaging, tmp_path: Path
) -> None:
    with fed.experiment(tmp_path, round_limit=1) as exp:
        exp.requests()  # connected: the researcher's inbox is live
        for name in HOSPITALS:
            client.send_raw(name, DEEP)
            client.send_raw(name, b'{"sender": "raw-researcher", "request_id": "deep-' + name.encode() + b'", "x": '
                            + DEEP + b"}")  # fmt: skip
            err = client.wait(f"deep-{name}", ("error",), timeout=30)
            assert err.code == "FS100" and "nested" in err.message
        mallory.publish_raw(topics.researcher("researcher", "mallory"), DEEP).wait_for_publish(10)
        assert exp.run_once() == 1
        assert {n for n, v in exp.training_replies()[0].items() if not v["dropped"]} == set(HOSPITALS)


def test_fuzzed_payloads_silence_no_party(
    fed: Federation, approved: Approved, client: RawResearcher, mallory: Messaging, tmp_path: Path
) -> None:
    with fed.experiment(tmp_path, round_limit=1) as exp:
        exp.requests()
        sent = {"n": 0}

        @settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
        @given(payloads())
        def fuzz(payload: bytes) -> None:
            node = list(HOSPITALS)[sent["n"] % len(HOSPITALS)]
            client.send_raw(node, payload)
            mallory.publish_raw(topics.researcher("researcher", "mallory"), payload)
            mallory.publish_raw(topics.researcher(client.party, "mallory"), payload)
            sent["n"] += 1

        fuzz()
        client.messaging.publish_raw(topics.broadcast(client.party), DEEP, sign=False).wait_for_publish(10)
        assert sent["n"] >= 150
        for name in HOSPITALS:
            assert fed.nodes[name].alive
            assert client.ping(name, timeout=60).node_id == name
        assert exp.run_once() == 1
        assert {n for n, v in exp.training_replies()[0].items() if not v["dropped"]} == set(HOSPITALS)
        for name in HOSPITALS:
            status = json.loads((fed.nodedir(name) / "status.json").read_text())
            assert status["broker_connected"] and status["receiver_restarts"] == 0


def test_the_node_audits_and_logs_the_party_that_really_sent_a_round(
    fed: Federation, approved: Approved, client: RawResearcher
) -> None:
    name = "hospital-b"
    req = client.train_request(approved.source, "LogReg", fed.datasets[name], params=zero_params(),
                               model_args=MODEL_ARGS)  # fmt: skip
    assert isinstance(req, TrainRequest)
    client.ask(name, req, ("train_reply",), timeout=120)
    rounds = AuditLog(fed.nodedir(name)).list(event="round_executed")
    mine = [e for e in rounds if e["details"].get("request_id") == req.request_id]
    assert mine and all(e["actor"] == f"researcher:{client.party}" for e in mine), rounds[-3:]
    # what a node admin follows in the daemon's terminal: the request and the round, at INFO
    terminal = fed.nodes[name].log_path.read_text(encoding="utf-8").splitlines()
    mine = [line for line in terminal if req.request_id in line]
    assert any(" INFO " in x and "queued" in x and f"from {client.party}" in x and req.plan.sha256[:12] in x
               for x in mine), mine  # fmt: skip
    assert any(" INFO " in x and "round finished" in x and req.job_id in x and ": ok, " in x and x.endswith("s")
               for x in mine), mine  # fmt: skip
