"""A job's round process keeps its memory flat across rounds (issue 11).

Since a job's rounds share one process, what a round leaves behind stays until the process ends. Measured
before these tests (peerbench large, 10.1 M parameters, one node): the round process grew 150 MB a round
(423 MB -> 1.6 GB over 10 rounds; the sandbox's address-space limit would have ended the job) because the
round's state sat in a reference cycle that only the cyclic collector frees, and it rarely ran. Each round also
took 39,000 page faults: glibc gave freed model-sized blocks back to the kernel and took fresh zeroed ones.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from fedsilo.common.serialization import params_to_bytes
from fedsilo.network.messages import BlobRef, TrainRequest
from fedsilo.node import round as node_round
from fedsilo.node import worker_process
from fedsilo.node.config import NodeConfig
from fedsilo.node.round import RoundContext, WorkerTask, execute_round
from fedsilo.node.workerwire import send_frame
from tests.support.plans import LOGREG_PLAN
from tests.support.tables import write_sign_csv

REF = BlobRef(sha256="a" * 64, size=1)


def test_a_rounds_state_is_freed_when_the_round_returns(tmp_path: Path) -> None:
    """No reference cycle through the round's state: with the cyclic collector off, nothing of a finished round
    (its `_Round`, plan, trainer, model) is left alive once its result is dropped."""
    csv = write_sign_csv(tmp_path / "d.csv", 40, seed=3)
    request = TrainRequest(sender="r", job_id="j", round=1, dataset_id="ds", plan=REF, plan_name="HeartPlan",
                           blobs={"params": REF}, training_args={"batch_size": 20, "log_interval": 1})  # fmt: skip
    config = NodeConfig.model_validate({"node": {"name": "n", "node_id": "n"}})
    params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    task = WorkerTask(request, LOGREG_PLAN, request.training_args, {"path": str(csv), "dataset_id": "ds",
                      "shape": [40, 5]}, {"params": params_to_bytes(params)}, tmp_path / "state")  # fmt: skip
    sent: list = []
    # the worker's warm-up (`_warm_up`) made an optimiser before any round: torch._dynamo's first import keeps
    # the frames that imported it, which would be this round's
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    gc.collect()
    gc.disable()
    try:
        result = execute_round(task, RoundContext(config), sent.append)
        assert "params" in result.blobs and any(type(m).__name__ == "ScalarMessage" for m in sent)
        del result, sent
        # type(), not isinstance(): isinstance reads `__class__`, and a lazy proxy among the process's objects
        # (Django's settings, once any test imported django.db) raises when touched before it is configured
        alive = [o for o in gc.get_objects() if type(o) is node_round._Round]
        assert alive == []
    finally:
        gc.enable()


def test_a_cycle_a_round_left_is_collected_before_the_jobs_next_round() -> None:
    """A plan's own reference cycle (not fedsilo's to break) is gone before the job's next task starts."""
    left: list[weakref.ref] = []
    seen: list[bool] = []

    class Held:
        pass

    def fake_run_task(header: dict, blobs: dict, plan_cache: dict, send) -> None:
        seen.append(bool(left) and left[-1]() is not None)
        cycle = Held()
        cycle.self = cycle  # type: ignore[attr-defined]
        left.append(weakref.ref(cycle))

    ours, theirs = socket.socketpair()
    gc.disable()
    original = worker_process._run_task
    worker_process._run_task = fake_run_task
    try:
        send_frame(ours.fileno(), {"op": "task", "task_id": "t2"})
        send_frame(ours.fileno(), {"op": "retire"})
        from multiprocessing.connection import Connection

        assert worker_process._job_rounds(Connection(os.dup(theirs.fileno())), {"op": "task", "task_id": "t1"}, {},
                                          lambda *a: None) == 0  # fmt: skip
    finally:
        worker_process._run_task = original
        gc.enable()
        ours.close()
        theirs.close()
    assert seen == [False, False]  # the second task found the first one's cycle collected


FAULTS = r"""
import resource, sys, threading
from fedsilo.common.malloc import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

counts = []
def rounds():
    for _ in range(4):  # a daemon's round thread: the model downloaded, the update received, both dropped
        before = faults()
        a, b = bytearray(40_000_000), bytearray(40_000_000)
        del a, b
        counts.append(faults() - before)

for _ in range(2):
    t = threading.Thread(target=rounds)
    t.start()
    t.join()
print(kept, counts[-1])
"""


def test_freed_model_sized_buffers_are_reused_not_faulted_in_again() -> None:
    out = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out[mode] = run.stdout.split()
    if out["keep"][0] != "True":
        pytest.skip("the C library is not glibc: mallopt is not there")
    assert int(out["default"][1]) > 15_000  # 80 MB of fresh pages a round (4 KiB each) without it
    assert int(out["keep"][1]) < 1_000
