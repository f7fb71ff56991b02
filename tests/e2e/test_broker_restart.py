"""The broker is killed (kill -9) between rounds and during a round, on each broker: `network start`
restarts it, nodes and the researcher reconnect, and unanswered requests are re-sent, so every round
of a five-round experiment completes with every node, without user action and without waiting out
the round timeout. Each round's wall time goes to test-output/ (the README quotes it)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.e2e.federation import HOSPITALS, TRAINING_ARGS, Approved, Federation, node_status, wait_for

ROUND_TIMEOUT = 90.0
# a round that trains for a few seconds: long enough to kill the broker while every node is inside it
LONG_ARGS = {**TRAINING_ARGS, "num_updates": 1500, "batch_size": 1, "log_interval": 100}


def test_every_round_survives_a_broker_killed_between_and_during_rounds(
    fed: Federation, approved: Approved, tmp_path: Path, test_output: Path
) -> None:
    events: dict[int, str] = {}
    with fed.experiment(tmp_path, round_limit=5, round_timeout=ROUND_TIMEOUT) as exp:
        assert exp.run_once() == 1  # round 0: warm

        fed.network.kill_broker(wait=False)  # round 1 starts while the broker is down
        events[1] = "broker killed just before the round"
        assert exp.run_once() == 1

        assert exp.run_once() == 1  # round 2: nothing happens

        exp.set_training_args(LONG_ARGS)
        worker = threading.Thread(target=exp.run_once)
        worker.start()
        wait_for(lambda: all(node_status(fed.nodedir(n)).get("current_task") for n in HOSPITALS), 60,
                 "every node training round 3")  # fmt: skip
        back_after = fed.network.kill_broker(wait=True)
        events[3] = f"broker killed while every node trained; back after {back_after:.3f}s"
        worker.join(ROUND_TIMEOUT + 30)
        assert not worker.is_alive()

        exp.set_training_args(TRAINING_ARGS)
        assert exp.run_once() == 1  # round 4

        replies, stats = exp.training_replies(), exp.round_stats()
    assert sorted(replies) == [0, 1, 2, 3, 4]
    for r, nodes in replies.items():
        ok = {n for n, v in nodes.items() if not v["dropped"]}
        assert ok == set(HOSPITALS), f"round {r}: {nodes}"
        assert stats[r]["wall_s"] < ROUND_TIMEOUT, f"round {r} waited out its timeout"
    record = {
        "broker": fed.broker,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rounds": {r: {"wall_s": round(stats[r]["wall_s"], 3), "event": events.get(r, "")} for r in sorted(stats)},
    }
    (test_output / f"broker-restart-{fed.broker}.json").write_text(json.dumps(record, indent=2))
