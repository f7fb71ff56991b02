"""The worker that runs plan code holds no credentials, and the daemon protects what leaves the node.

A node daemon as a process on each broker; its daemon's environment deliberately holds the file-store
token and names the network folder (every party's credentials), as a careless administrator's would.
What is checked from outside: the worker's /proc environ, command line, working folder, open files and
memory. From inside, approved plans act as a hostile researcher would: one searches every path and
object it can reach for network.json or a client, one poisons the update with NaN after the trainer's
checks, one writes a pickle to the worker's socket. (A plan can still open files by absolute path: an
OS sandbox around the worker is the trust issue's part.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.common.serialization import params_from_bytes
from fedsilo.network.credentials import Credentials
from fedsilo.node.config import NodeConfig, node_paths
from fedsilo.node.datasets import DatasetStore
from fedsilo.node.plans import PlanStore
from tests.support.brokers import BOTH
from tests.support.client import RawResearcher
from tests.support.plans import LOGREG_PLAN
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, start_node

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py

CLIP = 0.05

SPY_PLAN = LOGREG_PLAN.replace("class HeartPlan", '''
import gc, os, sys
from pathlib import Path, PurePath

FOUND = {"paths_checked": 0, "credentials_found": 0, "clients_found": 0}


def _strings():
    """Every path-like string this process can reach: environment, arguments, cwd, open files, and the
    strings and paths held by every object the garbage collector tracks."""
    yield from os.environ.values()
    yield from sys.argv
    yield os.getcwd()
    for fd in os.listdir("/proc/self/fd"):
        try:
            yield os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    for obj in gc.get_objects():
        if type(obj).__name__ in ("Credentials", "FileStoreSettings", "MqttSettings", "FileStoreClient"):
            FOUND["clients_found"] += 1
        if isinstance(obj, dict):
            items = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj)
        else:
            items = [obj]
        for item in items:
            if isinstance(item, PurePath):
                yield str(item)
            elif isinstance(item, str) and item.startswith("/") and len(item) < 4096:
                yield item


def search():
    seen = set()
    for text in set(_strings()):
        path = Path(text)
        for folder in [path, *path.parents]:
            if folder in seen:
                continue
            seen.add(folder)
            FOUND["paths_checked"] += 1
            try:
                if (folder / "network.json").is_file() or (folder / "credentials").is_dir():
                    FOUND["credentials_found"] += 1
            except OSError:
                pass


class HeartPlan''').replace("    def training_step(self, data, target):", '''    def testing_step(self, data, target):
        if not FOUND["paths_checked"]:
            search()
        return {k: float(v) for k, v in FOUND.items()}

    def training_step(self, data, target):''')

NAN_PLAN = LOGREG_PLAN.replace("class HeartPlan", '''
import fedsilo.node.trainer as _trainer

_train = _trainer.Trainer.train


def _poisoned(self, *args, **kwargs):
    """After the trainer's own NaN check: what a plan inside the worker can do to the update."""
    result = _train(self, *args, **kwargs)
    if type(self.plan).__name__ == "HeartPlan" and getattr(self.plan, "POISON", False):
        for value in result.params.values():
            value.fill_(float("nan"))
    return result


_trainer.Trainer.train = _poisoned


class HeartPlan''').replace('CSV."""', 'CSV."""\n    POISON = True')

STEP = "    def training_step(self, data, target):"
PICKLE_PLAN = LOGREG_PLAN.replace(STEP, STEP + '''
        import gc, pathlib, sys
        from multiprocessing.connection import Connection

        class Touch:
            def __reduce__(self):
                return (pathlib.Path.touch, (pathlib.Path(self.marker),))

        touch = Touch()
        touch.marker = self.model_args["marker"]
        # the worker's socket, wherever plan code can reach it: the collector's objects (the warm worker's are
        # frozen out of gc.get_objects since it freezes them before forking) and the frames that called this step
        frame, found = sys._getframe(), list(gc.get_objects())
        while frame is not None:
            found += list(frame.f_locals.values())
            frame = frame.f_back
        for obj in {id(o): o for o in found if isinstance(o, Connection) and not o.closed}.values():
            obj.send(touch)  # multiprocessing's own send: a pickle''')

RENICE_PLAN = LOGREG_PLAN.replace(STEP, '''    def testing_step(self, data, target):
        import os

        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # back to the daemon's priority, if it could
        except OSError:
            pass
        return {"niceness": float(niceness), "niceness_after": float(os.getpriority(os.PRIO_PROCESS, 0))}

''' + STEP)

PLANS = {"spy": SPY_PLAN, "nan": NAN_PLAN, "pickle": PICKLE_PLAN, "plain": LOGREG_PLAN, "renice": RENICE_PLAN}


@dataclass
class Setup:
    net: NetworkHandle
    node: NodeHandle
    researcher: RawResearcher
    dataset_id: str
    creds: Credentials

    @property
    def worker_pid(self) -> int:
        pid = json.loads(node_paths(self.node.nodedir).status.read_text())["worker_pid"]
        assert pid, "the worker is not running"
        return int(pid)

    def round(self, plan: str, **kwargs: object) -> object:
        params = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
        req = self.researcher.train_request(PLANS[plan], "HeartPlan", self.dataset_id, params=params,
                                            job_id=f"job-{plan}", **kwargs)  # type: ignore[arg-type]  # fmt: skip
        return self.researcher.ask("n1", req, ("train_reply", "error"))


@pytest.fixture(scope="module", params=BOTH)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp(f"secrets-{request.param}")
    net = start_network(root / "net", broker=request.param)
    data = root / "data"  # outside the node directory: a path the plan is handed that leads nowhere
    data.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4))
    rows = "".join(",".join(f"{v:.4f}" for v in r) + f",{int(r[0] > 0)}\n" for r in x)
    (data / "d.csv").write_text("a,b,c,d,label\n" + rows)
    nodedir = root / "n1"
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", "n1", "--network", str(net.netdir),
                    "--data-root", str(data), "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    cfg = NodeConfig.load(nodedir)
    cfg.dp.update_clip = CLIP
    cfg.save()
    ds = DatasetStore(nodedir).add("d", ["demo"], "csv", data / "d.csv", added_by="test")
    plans = PlanStore(nodedir)
    for source in PLANS.values():
        plans.approve(plans.submit(source, "HeartPlan", "researcher")["sha256"], by="test", note="test plans")
    creds = Credentials.load(nodedir / "network.json")
    # The daemon's environment names the network folder and holds a token: the worker must not inherit them.
    saved = {k: os.environ.get(k) for k in ("FEDSILO_NETWORK", "FEDSILO_TOKEN_PROBE")}
    os.environ.update(FEDSILO_NETWORK=str(net.netdir), FEDSILO_TOKEN_PROBE=creds.filestore.token)
    try:
        node = start_node(nodedir)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    researcher = RawResearcher.for_network(net)
    yield Setup(net, node, researcher, ds["dataset_id"], creds)
    node.stop()
    researcher.close()
    net.stop()


def _secrets(s: Setup) -> list[bytes]:
    return [s.creds.mqtt.password.encode(), s.creds.filestore.token.encode()]


def test_worker_environment_arguments_and_files_hold_no_secret(setup: Setup) -> None:
    s = setup
    assert s.round("plain").kind == "train_reply"  # a round ran: the worker was handed a task
    pid, proc = s.worker_pid, Path(f"/proc/{setup.worker_pid}")
    daemon_env = Path(f"/proc/{s.node.proc.pid}/environ").read_bytes()  # type: ignore[union-attr]
    assert s.creds.filestore.token.encode() in daemon_env  # the test's premise: the daemon holds one
    environ, cmdline = (proc / "environ").read_bytes(), (proc / "cmdline").read_bytes()
    for secret in _secrets(s):
        assert secret not in environ and secret not in cmdline
    assert b"FEDSILO" not in environ
    handed = [os.readlink(proc / "cwd")] + [os.readlink(fd) for fd in (proc / "fd").iterdir()]
    handed += cmdline.decode().split("\0")
    forbidden = (str(s.node.nodedir.resolve()), str(s.net.netdir.resolve()))
    assert not [p for p in handed if p.startswith(forbidden)], (pid, handed)


def test_worker_memory_holds_no_secret(setup: Setup) -> None:
    """Every writable mapping of the worker (heap, stacks, anonymous memory), read through /proc/<pid>/mem
    after a round: neither the broker password nor the file-store token is anywhere in it."""
    s = setup
    assert s.round("plain").kind == "train_reply"
    proc, secrets, scanned = Path(f"/proc/{s.worker_pid}"), _secrets(s), 0
    with open(proc / "mem", "rb", buffering=0) as mem:
        for line in (proc / "maps").read_text().splitlines():
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(v, 16) for v in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except OSError:  # a guard page or a mapping gone meanwhile
                continue
            scanned += len(chunk)
            assert not [x for x in secrets if x in chunk], line
    assert scanned > 10 << 20  # torch's heap at least: the scan read the memory that matters


def test_an_approved_plan_finds_neither_credentials_nor_a_client(setup: Setup) -> None:
    reply = setup.round("spy", test_ratio=0.25)
    assert reply.kind == "train_reply", reply
    assert reply.metrics["test_paths_checked"] >= 3  # it did look (the dataset's folder and its parents)
    assert reply.metrics["test_credentials_found"] == 0
    assert reply.metrics["test_clients_found"] == 0


def test_plan_code_runs_below_the_daemon_and_cannot_raise_itself_back(setup: Setup) -> None:
    """`[node] worker_nice` (10 by default): the worker and its rounds' processes run at that niceness, the
    daemon at its own, and plan code cannot bring its priority back up to the daemon's."""
    daemon = os.getpriority(os.PRIO_PROCESS, setup.node.proc.pid)  # type: ignore[union-attr]
    reply = setup.round("renice", test_ratio=0.25)
    assert reply.kind == "train_reply", reply
    wanted = max(daemon, NodeConfig.load(setup.node.nodedir).node.worker_nice)
    assert wanted > daemon  # the premise: the daemon runs above the default's 10
    assert reply.metrics["test_niceness"] == reply.metrics["test_niceness_after"] == wanted
    assert os.getpriority(os.PRIO_PROCESS, setup.worker_pid) == wanted


def test_a_nan_update_made_inside_the_worker_is_refused_by_the_daemon(setup: Setup) -> None:
    reply = setup.round("nan")
    assert reply.kind == "error", reply
    assert (reply.code, reply.stage) == ("FS503", "update"), reply
    assert "refused before upload" in reply.message


def test_a_pickle_written_to_the_worker_socket_runs_nothing_in_the_daemon(setup: Setup, tmp_path: Path) -> None:
    marker = tmp_path / "daemon-unpickled"
    reply = setup.round("pickle", model_args={"marker": str(marker)})
    assert reply.kind == "error" and reply.code == "FS501", reply  # the worker broke the protocol: restarted
    assert not marker.exists()
    assert setup.node.alive
    assert setup.round("plain").kind == "train_reply"  # a fresh worker takes the next round


def test_update_is_clipped_to_the_node_norm_and_reported(setup: Setup) -> None:
    s = setup
    reply = s.round("plain", optimizer_args={"lr": 0.5})
    assert reply.kind == "train_reply", reply
    clip = reply.applied_caps["update_clip"]
    assert clip["applied"] == CLIP and clip["clipped"] and clip["norm"] > CLIP
    update = params_from_bytes(s.researcher.files.download_bytes(reply.params))  # the global model was zeros
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    assert norm == pytest.approx(CLIP, rel=1e-5)
    assert reply.sample_size == 64  # the trainer's count
