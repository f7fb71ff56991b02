"""The supervisor's restart policy on real child processes (a sleeping Python), without a network:
crash -> restart at once, repeated crash -> growing pause, failed restart -> retried, and each step in
state.json. The real broker and file store are in tests/integration/test_network_supervision.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedsilo.common.processes import ChildProcess, die_with_parent, exit_reason
from fedsilo.network import provision
from fedsilo.network.supervisor import BACKOFF_MAX_S, Supervised, Supervisor, backoff


class Sleeper(ChildProcess):
    """A child that sleeps; `start` fails while `fail` is set (as a broker whose port is taken would)."""

    fail = False

    def start(self, timeout: float) -> None:
        self.spawn([sys.executable, "-c", "import time; time.sleep(600)"])
        if Sleeper.fail:
            raise RuntimeError("port taken")


@pytest.fixture
def supervisor(tmp_path: Path) -> Supervisor:
    paths = provision.network_paths(tmp_path)
    cfg = provision.init_network(paths.root, mqtt_port=1, http_port=2, broker="embedded")
    child = Supervised("broker", "broker (test)", lambda: Sleeper(tmp_path / "child.log"), 5)
    sup = Supervisor(paths, cfg, children=[child])
    sup.start()
    sup.write_state()
    Sleeper.fail = False
    yield sup
    Sleeper.fail = False
    sup.stop()


def crash(sup: Supervisor) -> int:
    """kill -9 the child and let the supervisor notice it; return the dead pid."""
    child = sup.children[0]
    pid = child.proc.pid
    os.kill(pid, signal.SIGKILL)
    child.proc._proc.wait(10)
    sup.check(child)
    return pid


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in range(1, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff(50) == BACKOFF_MAX_S


def test_exit_reasons() -> None:
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(3) == "exited with status 3"


def test_a_crash_is_restarted_at_once_and_recorded(supervisor: Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    supervisor.children[0].started_at -= 60  # ran for a minute: a fresh crash, no pause
    with caplog.at_level(logging.WARNING, logger="fedsilo.network.supervisor"):
        old = crash(supervisor)
    state = provision.read_state(supervisor.paths.root)
    assert state["broker_pid"] != old and psutil.pid_exists(state["broker_pid"])
    assert state["restarts"]["broker"]["count"] == 1
    assert state["restarts"]["broker"]["last_reason"] == "killed by SIGKILL"
    assert f"(pid {old}) killed by SIGKILL; restarting it now" in caplog.text


def test_a_crash_soon_after_a_restart_waits_before_the_next(supervisor: Supervisor) -> None:
    crash(supervisor)
    crash(supervisor)
    child = supervisor.children[0]
    assert child.retry_at is not None and child.retry_at - child.died_at == pytest.approx(backoff(2))
    supervisor.check(child)
    assert not child.proc.alive()  # still waiting: no restart before its time
    child.retry_at = time.monotonic()
    supervisor.check(child)
    assert child.proc.alive() and child.restarts == 2


def test_a_failed_restart_is_stopped_recorded_and_retried(supervisor: Supervisor) -> None:
    Sleeper.fail = True
    crash(supervisor)
    child = supervisor.children[0]
    failed = child.proc
    assert not failed.alive()  # the half-started process does not linger
    state = provision.read_state(supervisor.paths.root)
    assert state["restarts"]["broker"]["last_reason"] == "restart failed: port taken"
    assert child.retry_at > time.monotonic()
    Sleeper.fail = False
    child.retry_at = time.monotonic()
    supervisor.check(child)
    assert child.proc.alive() and child.restarts == 1


GRANDPARENT = """
import subprocess, sys, time
from fedsilo.common.processes import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         preexec_fn=die_with_parent() if sys.argv[1] == "1" else None)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("pdeathsig", [True, False])
def test_a_child_dies_with_its_parent_only_with_pdeathsig(pdeathsig: bool) -> None:
    assert die_with_parent() is not None, "Linux has prctl"
    parent = subprocess.Popen([sys.executable, "-c", GRANDPARENT, "1" if pdeathsig else "0"], stdout=subprocess.PIPE)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.kill()
        parent.wait(10)
        gone, _ = psutil.wait_procs([child], timeout=10 if pdeathsig else 1)
        assert bool(gone) == pdeathsig
    finally:
        if child.is_running():
            child.kill()
