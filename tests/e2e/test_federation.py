"""End to end, on each broker: one network, three hospital node daemons (separate processes, data
registered and plans approved through the node CLI) and a researcher's `Experiment`. No mocks.

The federation (fixtures in conftest.py) is shared by the e2e modules; the tests that kill daemons
start them again, so every test finds three nodes running.
"""

from __future__ import annotations

import pickle
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from fedsilo.common.errors import RemoteError
from fedsilo.network.messages import PingRequest
from fedsilo.node.plans import PlanStore
from fedsilo.researcher import ExperimentError
from tests.e2e.federation import (
    HOSPITALS,
    MODEL_ARGS,
    ROWS,
    SLOW_ARGS,
    TRAINING_ARGS,
    Approved,
    Federation,
    Trap,
    Unreviewed,
    accuracy,
    fedsilo,
    import_plan,
    node_status,
    wait_for,
    zero_params,
)
from tests.support.client import RawResearcher


# ------------------------------------------------------------------------------------------ tests
def test_unknown_tag_finds_no_node(fed: Federation, tmp_path: Path) -> None:
    with fed.experiment(tmp_path, tags=["no-such-tag"]) as exp:
        assert exp.training_data() == {}
        with pytest.raises(ExperimentError) as info:
            exp.run_once()
    message = str(info.value)
    # clear: which tags, that every node answered, and what to do
    assert "no-such-tag" in message and "3 node(s) answered" in message, message
    assert all(name in message for name in HOSPITALS), message
    assert exp.round_current() == 0


def test_unapproved_plan_is_refused_and_recorded_pending(fed: Federation, tmp_path: Path) -> None:
    with fed.experiment(tmp_path, plan=Unreviewed) as exp:
        sha = exp.training_plan_hash()
        with pytest.raises(RemoteError, match=sha) as info:
            exp.run_once()
        assert info.value.code == "FS300" and info.value.node in HOSPITALS
        assert exp.round_current() == 0
        assert exp.check_training_plan_status() == dict.fromkeys(HOSPITALS, "pending")
    for name in HOSPITALS:
        listed = fedsilo("node", "plan", "list", "--dir", str(fed.nodedir(name)), "--status", "pending")
        assert sha[:16] in listed and "Unreviewed" in listed, listed
        assert PlanStore(fed.nodedir(name)).status(sha) == "pending"


def test_fedavg_over_three_nodes_learns(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    x, y = fed.heldout
    with fed.experiment(tmp_path, round_limit=3) as exp:
        assert exp.training_plan_hash() == approved.sha256
        initial = accuracy(exp.training_plan().model(), x, y)
        assert exp.run() == 3
        replies = exp.training_replies()
        assert sorted(replies) == [0, 1, 2]
        for r in replies.values():
            assert sorted(r) == sorted(HOSPITALS)
            assert all(v["dropped"] is None and v["sample_size"] == ROWS for v in r.values()), r
            assert {v["dataset_id"] for v in r.values()} == set(fed.datasets.values())
        losses = [np.mean([v["metrics"]["loss"] for v in replies[r].values()]) for r in sorted(replies)]
        assert losses[-1] < losses[0], losses
        final = accuracy(exp.training_plan().model(), x, y)
    # the aggregated model learned the shared boundary despite each node's skewed labels
    assert initial == pytest.approx(0.5) and final > initial + 0.2, (initial, final)


def test_plan_changed_by_one_character_is_refused(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    changed = approved.source.replace("tabular features.", "tabular features!")
    variant = import_plan(changed, "LogReg", tmp_path)
    with fed.experiment(tmp_path, plan=variant) as exp:
        shipped = exp.training_plan_file()
        assert len(shipped) == len(approved.source)
        assert sum(a != b for a, b in zip(shipped, approved.source, strict=True)) == 1
        sha = exp.training_plan_hash()
        with pytest.raises(RemoteError, match=sha) as info:
            exp.run_once()
        assert info.value.code == "FS300"
        assert exp.check_training_plan_status() == dict.fromkeys(HOSPITALS, "pending")
    for name in HOSPITALS:
        store = PlanStore(fed.nodedir(name))
        assert store.status(approved.sha256) == "approved" and store.status(sha) == "pending"


def test_pickle_parameters_are_refused_unloaded(
    fed: Federation, approved: Approved, client: RawResearcher, tmp_path: Path
) -> None:
    # The payload is live: unpickled here, it creates its marker.
    probe = tmp_path / "probe-unpickled"
    pickle.loads(pickle.dumps(Trap(probe))).close()
    assert probe.exists()

    name = "hospital-b"
    marker = tmp_path / "node-unpickled"
    worker_before = node_status(fed.nodedir(name)).get("worker_pid")
    hostile = client.files.upload_bytes(pickle.dumps({"weight": Trap(marker), "bias": Trap(marker)}))
    req = client.train_request(approved.source, "LogReg", fed.datasets[name], params_ref=hostile, model_args=MODEL_ARGS)
    reply = client.ask(name, req, ("train_reply", "error"))
    assert reply.kind == "error", reply
    assert reply.code == "FS400" and reply.stage == "params", reply
    assert not marker.exists()
    assert fed.nodes[name].alive
    assert client.ping(name).node_id == name
    # refused by the parameter check itself, not by a crash of the worker
    assert node_status(fed.nodedir(name)).get("worker_pid") == worker_before


def test_malformed_and_oversized_messages_are_answered(fed: Federation, client: RawResearcher) -> None:
    name, me = "hospital-a", client.party.encode()
    # invalid JSON, signed (it ends like an object): the signature holds, the parser refuses it
    client.send_raw(name, b'{"sender": "' + me + b'", "request_id": "bad1", "kind": }')
    assert client.wait("bad1", ("error",), timeout=30).code == "FS100"
    # valid JSON, wrong schema: a train request without its plan or parameters
    client.send_raw(name, b'{"sender": "' + me + b'", "request_id": "bad2", "kind": "train_request", "round": 0}')
    err = client.wait("bad2", ("error",), timeout=30)
    assert err.code == "FS100" and err.stage == "receive", err
    big = b'{"sender": "' + me + b'", "request_id": "big1", "pad": "' + b"x" * 300_000 + b'"}'
    client.send_raw(name, big)
    assert client.wait("big1", ("error",), timeout=30).code == "FS100"
    client.send_raw(name, bytes(range(256)) * 4)  # no sender to answer: only logged
    assert fed.nodes[name].alive
    assert client.ask(name, PingRequest(sender=client.party), ("ping_reply",)).node_id == name


def test_queued_task_survives_a_daemon_restart(fed: Federation, approved: Approved, client: RawResearcher) -> None:
    name = "hospital-a"
    node = fed.nodes[name]
    req = client.train_request(approved.source, "LogReg", fed.datasets[name], params=zero_params(),
                               model_args=MODEL_ARGS, **SLOW_ARGS)  # fmt: skip
    client.send(name, req)
    client.wait(req.request_id, ("task_ack",))
    node.stop(signal.SIGKILL)  # no farewell: the worker dies with it, the task stays unacked in the queue
    # a reply now would mean the task finished before the kill and the restart proves nothing
    assert [m.kind for m in client.received(req.request_id)] == []
    node.start()
    # ready means this daemon is connected, not the killed one whose status.json still says so
    assert node_status(node.nodedir)["pid"] == node.proc.pid
    reply = client.wait(req.request_id, ("train_reply", "error"), timeout=240)
    assert reply.kind == "train_reply", reply
    assert reply.sample_size == ROWS
    log = (node.nodedir / "logs" / "node.log").read_text(encoding="utf-8").splitlines()
    starts = [line for line in log if f"node '{name}' started" in line]
    assert "1 queued task(s)" in starts[-1], starts  # run again from the queue, not sent again


def test_node_killed_mid_round_is_dropped_and_rejoins(fed: Federation, approved: Approved, tmp_path: Path) -> None:
    """Runs last: kills hospital-c's daemon during a round, goes on without it, then restarts it."""
    victim = "hospital-c"
    survivors = sorted(set(HOSPITALS) - {victim})
    with fed.experiment(tmp_path, training_args=SLOW_ARGS, round_timeout=60) as exp:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                exp.run_once()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        # kill it once it streams training scalars: mid-round, after it acknowledged the task
        wait_for(lambda: victim in exp.monitor().last or not worker.is_alive(), 120, f"{victim} training")
        assert worker.is_alive(), errors
        fed.nodes[victim].stop(signal.SIGKILL)
        worker.join(180)
        assert not worker.is_alive() and not errors, errors

        first = exp.training_replies()[0]
        assert all(first[n]["dropped"] is None for n in survivors), first
        assert first[victim]["dropped"]["kind"] in {"offline", "timeout"}, first[victim]
        rows = {line.split()[1]: line for line in exp.metrics_table().splitlines()[2:] if line.startswith("0 ")}
        assert "dropped" in rows[victim] and "dropped" not in rows[survivors[0]], rows

        # the experiment goes on with the two others
        exp.set_training_args(TRAINING_ARGS)
        assert exp.run_once() == 1
        second = exp.training_replies()[1]
        assert second[victim]["dropped"]["kind"] == "offline"
        assert all(second[n]["dropped"] is None for n in survivors)

        # back online, the node takes part again (and later tests find three nodes)
        fed.nodes[victim].start()
        wait_for(lambda: exp.requests().nodes().get(victim, None) is not None and exp.requests().nodes()[victim].online,
                 30, f"{victim} presence")  # fmt: skip
        assert exp.run_once() == 1
        third = exp.training_replies()[2]
        assert sorted(third) == sorted(HOSPITALS) and all(v["dropped"] is None for v in third.values()), third
        assert exp.round_current() == 3
