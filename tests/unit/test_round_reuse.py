"""The daemon's decision to hand a round to the last round's process (`node/worker.py` `reuse_key`, `_reusable`).

A job's rounds share one confined process only while everything that decides what the process may see and run is
the same: the researcher and job, the plan's source, the dataset's record and the node's config. Anything else, a
failed round, or a process that used a quarter of the per-round CPU limit, gets a fresh process.
"""

from __future__ import annotations

import pytest

from fedsilo.node.worker import REUSE_CPU_SHARE, _reusable, reuse_key

BASE = {"job": "alice/job-1", "source": "class P: ...", "state_dir": "/x/1",
        "record": {"dataset_id": "d1", "path": "/data/d1.csv"},
        "config": {"node": {"round_process": "job"}, "limits": {"sandbox_cpu_s": 100}}}


def test_the_same_job_plan_dataset_and_config_share_a_process_whatever_else_differs() -> None:
    later = {**BASE, "state_dir": "/x/2", "sent_at": 5.0, "request": "{...}"}  # per-round fields do not count
    assert reuse_key(BASE) is not None and reuse_key(BASE) == reuse_key(later)


@pytest.mark.parametrize("change", [
    {"job": "bob/job-1"},                                         # another researcher
    {"job": "alice/job-2"},                                       # another job of the same researcher
    {"source": "class P: pass"},                                  # another plan
    {"record": {"dataset_id": "d2", "path": "/data/d2.csv"}},    # another dataset
    {"config": {"node": {"round_process": "job"}, "limits": {"sandbox_cpu_s": 50}}},  # the admin changed a limit
])  # fmt: skip
def test_anything_that_decides_what_a_process_may_see_or_run_gets_a_fresh_one(change: dict) -> None:
    assert reuse_key({**BASE, **change}) != reuse_key(BASE)


def test_round_process_round_or_no_job_means_a_fresh_process_every_round() -> None:
    assert reuse_key({**BASE, "config": {"node": {"round_process": "round"}}}) is None
    assert reuse_key({k: v for k, v in BASE.items() if k != "job"}) is None


@pytest.mark.parametrize(("result", "reusable"), [
    ({"ok": True, "process_cpu_s": 1.0}, True),
    ({"ok": True, "process_cpu_s": REUSE_CPU_SHARE * 100}, False),  # three quarters of the limit must remain
    ({"ok": False, "process_cpu_s": 1.0}, False),                   # a failed round retires its process
    ({"ok": True}, False),                                          # no CPU figure: not trusted to have room
    ({"ok": True, "process_cpu_s": -1.0}, False),
    ({"ok": True, "process_cpu_s": "1"}, False),
])  # fmt: skip
def test_a_process_takes_the_next_round_only_after_a_success_with_cpu_to_spare(result: dict, reusable: bool) -> None:
    assert _reusable(result, BASE) is reusable
