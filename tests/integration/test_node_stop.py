"""A node daemon stopped (SIGTERM) while its training worker is still starting stops cleanly:
exit status 0 and no ERROR in its log, on each broker. Stopping during start-up is not a failure."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedsilo.node.config import node_paths
from tests.support.brokers import BOTH
from tests.support.procs import FEDSILO, NetworkHandle, NodeHandle, start_network, wait_until

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py


@pytest.fixture(scope="module", params=BOTH)
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = start_network(tmp_path_factory.mktemp(f"stop-{request.param}"), broker=request.param)
    yield handle
    handle.stop()


def _worker_spawned(pid: int) -> bool:
    """The daemon has started its worker process (node/worker_process.py)."""
    try:
        children = psutil.Process(pid).children()
        return any("fedsilo.node.worker_process" in " ".join(c.cmdline()) for c in children)
    except psutil.Error:
        return False


def _worker_ready(nodedir: Path) -> bool:
    status = json.loads(node_paths(nodedir).status.read_text(encoding="utf-8"))
    return status.get("worker_pid") is not None


def test_sigterm_while_the_worker_starts_is_a_clean_stop(net: NetworkHandle, tmp_path: Path) -> None:
    nodedir = tmp_path / "n1"
    subprocess.run([*FEDSILO, "node", "init", "--dir", str(nodedir), "--name", "n1", "--network", str(net.netdir),
                    "--threads", "1"], check=True, capture_output=True)  # fmt: skip
    node = NodeHandle(nodedir=nodedir, log_path=tmp_path / "daemon.out")
    node.start()  # returns once connected; the worker (torch import, warm-up step) takes seconds more
    assert node.proc is not None
    wait_until(lambda: _worker_spawned(node.proc.pid), node.proc, node.log_path, 30, "the worker's spawn")
    assert not _worker_ready(nodedir), "the worker was ready before the stop: this test did not stop a start-up"

    assert node.stop() == 0
    log = node_paths(nodedir).log_file.read_text(encoding="utf-8")
    errors = [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert errors == []
    assert "worker start-up interrupted" in log and "stopped" in log
    assert "Traceback" not in node.log_path.read_text(encoding="utf-8")
