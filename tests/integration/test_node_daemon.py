"""The node daemon as a separate process against a real network (broker + file store), spoken to with
hand-built messages. What must hold on both brokers, and the daemon's defences against hostile input
and crashes, is tested in tests/e2e/test_federation.py."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.common.codecs import Compression
from fedsilo.common.codecs_update import decode_update
from fedsilo.common.serialization import params_from_bytes
from fedsilo.network.messages import ListRequest, PingRequest, PlanStatusRequest, SearchRequest, TrainRequest
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.client import RawResearcher
from tests.support.plans import LOGREG_PLAN
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node

PLAN_SRC = LOGREG_PLAN


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = start_network(tmp_path_factory.mktemp("net"), broker="embedded")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def setup(
    net: NetworkHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RawResearcher, NodeHandle, dict]]:
    root = tmp_path_factory.mktemp("node")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4))
    y = (x[:, 0] > 0).astype(int)
    (data / "d.csv").write_text(
        "a,b,c,d,label\n" + "".join(",".join(f"{v:.4f}" for v in r) + f",{t}\n" for r, t in zip(x, y, strict=True))
    )
    nodedir = root / "n1"
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", "n1", "--network", str(net.netdir),
                    "--data-root", str(data), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    ds = DatasetStore(nodedir).add("d", ["demo"], "csv", data / "d.csv", added_by="test")
    node = start_node(nodedir)
    researcher = RawResearcher.for_network(net)
    yield researcher, node, ds
    node.stop()
    researcher.close()


def _train_request(researcher: RawResearcher, source: str, dataset_id: str, **targs) -> TrainRequest:
    params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    return researcher.train_request(source, "HeartPlan", dataset_id, params=params, **targs)


def test_ping_search_list(setup):
    researcher, _, ds = setup
    me = researcher.creds.party
    assert researcher.ask("n1", PingRequest(sender=me), ("ping_reply",)).node_id == "n1"
    found = researcher.ask("n1", SearchRequest(sender=me, tags=["demo"]), ("search_reply",))
    assert [d.dataset_id for d in found.datasets] == [ds["dataset_id"]]
    assert researcher.ask("n1", SearchRequest(sender=me, tags=["nope"]), ("search_reply",)).datasets == []
    listed = researcher.ask("n1", ListRequest(sender=me), ("list_reply",))
    assert "path" not in listed.datasets[0].model_dump()


def test_unknown_dataset(setup):
    researcher, _, _ = setup
    req = _train_request(researcher, PLAN_SRC, "ds_doesnotexist")
    err = researcher.ask("n1", req, ("error",))
    assert err.code == "FS200"


def test_plan_approval_flow_and_training(setup):
    researcher, node, ds = setup
    me = researcher.creds.party
    store = PlanStore(node.nodedir)
    req = _train_request(researcher, PLAN_SRC, ds["dataset_id"])
    err = researcher.ask("n1", req, ("error",))
    assert err.code == "FS300" and req.plan.sha256 in err.message
    assert store.status(req.plan.sha256) == "pending"
    st = researcher.ask("n1", PlanStatusRequest(sender=me, plan_sha256=req.plan.sha256), ("plan_status_reply",))
    assert st.status == "pending" and st.approval_required

    store.approve(req.plan.sha256, by="test")
    req2 = _train_request(researcher, PLAN_SRC, ds["dataset_id"], job_id="job-trained")
    reply = researcher.ask("n1", req2, ("train_reply", "error"))
    assert reply.kind == "train_reply", reply
    assert reply.sample_size == 64 and set(reply.timings) >= {"download_s", "train_s", "upload_s", "total_s"}
    # where the node's round went: its stages, the exchange with the worker, the worker's own stages within it
    assert set(reply.timings) >= {"load_params", "protect", "upload", "worker", "worker.build_plan", "worker.train"}
    assert reply.timings["worker"] >= reply.timings["worker.train"] > 0
    # the node streams scalars before it replies (same topic, QoS 1: in order)
    assert "loss" in reply.metrics and [m for m in researcher.scalars if m.job_id == "job-trained"]
    params = params_from_bytes(researcher.files.download_bytes(reply.params))
    assert not torch.equal(params["weight"], torch.zeros(2, 4))
    # (a plan changed after approval is refused: tests/e2e/test_federation.py, on both brokers)

    store.revoke(req.plan.sha256, by="test", note="withdrawn")
    err = researcher.ask("n1", _train_request(researcher, PLAN_SRC, ds["dataset_id"]), ("error",))
    assert err.code == "FS301"


def test_the_daemon_runs_a_compressed_round_without_torch(setup):
    """The daemon parses, checks and int8-encodes the update in numpy: after a real round its process has
    mapped no libtorch (the warm worker and the round's fork have; 147 MiB of private memory per process)."""
    researcher, node, ds = setup
    store = PlanStore(node.nodedir)
    req = _train_request(researcher, PLAN_SRC, ds["dataset_id"], job_id="job-no-torch")
    store.approve(req.plan.sha256, by="test")
    req = req.model_copy(update={"compression": Compression.of("int8")})
    reply = researcher.ask("n1", req, ("train_reply", "error"))
    assert reply.kind == "train_reply", reply
    assert reply.applied_caps["compression"]["applied"] == "int8"  # the node's compress stage ran
    update = decode_update(researcher.files.download_bytes(reply.params), {"weight": torch.zeros(2, 4),
                           "bias": torch.zeros(2)}, Compression.of("int8"))  # fmt: skip
    assert not torch.equal(update["weight"], torch.zeros(2, 4))
    assert node.proc is not None
    maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps
    worker_maps = [Path(f"/proc/{p}/maps").read_text() for p in _children(node.proc.pid)]
    assert any("libtorch" in m for m in worker_maps), "the check must see torch where it is: in the worker"
    store.revoke(req.plan.sha256, by="test", note="done")


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (bwrap, the warm worker)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            found += kids
            todo += kids
    return found


def test_status_json_is_rewritten_at_most_every_status_gap(setup):
    """A round's start and end and each queued request mark status.json due; the daemon rewrites it at most every
    `STATUS_GAP_S` (each rewrite replaces the file: a new inode). Before, every round rewrote it three times."""
    import os
    import threading
    import time

    from fedsilo.node.daemon import NodeDaemon

    researcher, node, ds = setup
    store = PlanStore(node.nodedir)
    store.approve(store.submit(PLAN_SRC, "HeartPlan", "raw-researcher")["sha256"], by="test")
    status = node.nodedir / "status.json"
    seen: set[tuple[int, int]] = set()  # (inode, mtime): a freed inode number is soon handed out again
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(status)
                seen.add((st.st_ino, st.st_mtime_ns))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    rounds = 8
    for _ in range(rounds):
        reply = researcher.ask("n1", _train_request(researcher, PLAN_SRC, ds["dataset_id"], job_id="job-status"),
                               ("train_reply", "error"))  # fmt: skip
        assert reply.kind == "train_reply", reply
    time.sleep(3 * NodeDaemon.STATUS_GAP_S)  # the last round's end is written too
    done.set()
    watcher.join()
    elapsed = time.monotonic() - started
    assert json.loads(status.read_text())["current_task"] is None
    assert 2 <= len(seen) <= elapsed / NodeDaemon.STATUS_GAP_S + 2, (len(seen), elapsed)
