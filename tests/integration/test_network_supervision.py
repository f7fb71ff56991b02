"""`fedsilo network start` supervises its broker and file store, on both brokers: a child killed with
SIGKILL comes back on the same port, `network start` killed with SIGKILL takes its children with it,
and processes it left behind anyway are reported and stopped by the next start."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from fedsilo.network import provision
from fedsilo.network.broker import broker_accepts
from fedsilo.network.cli import network as network_cli
from fedsilo.network.supervisor import PDEATHSIG_ENV
from tests.support.procs import NetworkHandle, start_network, start_process, stop_process

BROKERS = [
    "embedded",
    pytest.param(
        "mosquitto",
        marks=[
            pytest.mark.mosquitto,
            pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed"),
        ],
    ),
]
GONE_WITHIN = 10.0  # a bound for "children gone", not a measurement (bench/broker_restart.py measures)


@pytest.fixture(scope="module", params=BROKERS)
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NetworkHandle:
    handle = start_network(tmp_path_factory.mktemp(f"supervised-{request.param}"), broker=request.param)
    yield handle
    handle.stop()


def monitor_accepted(net: NetworkHandle) -> bool:
    return broker_accepts(net.credentials(provision.MONITOR).mqtt, timeout=5)


def network_status(net: NetworkHandle) -> str:
    result = CliRunner().invoke(network_cli, ["status", "--dir", str(net.netdir)])
    assert result.exit_code == 0, result.output
    return result.output


def wait_gone(pids: list[int], ports: list[int]) -> None:
    """Wait until none of `pids` runs and every port is free; fail after GONE_WITHIN seconds."""
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive and all(port_free(p) for p in ports):
            return
        time.sleep(0.05)
    pytest.fail(f"still there after {GONE_WITHIN}s: pids {alive}, ports {[p for p in ports if not port_free(p)]}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def children(state: dict) -> list[int]:
    return [state["broker_pid"], state["filestore_pid"]]


# ---------------------------------------------------------------------------------------- a child crashes
def test_a_killed_broker_is_back_on_the_same_port_with_its_new_pid_recorded(net: NetworkHandle) -> None:
    before = dict(net.state)
    net.kill_broker()
    after = net.read_state()
    assert after["broker_pid"] != before["broker_pid"]
    assert not psutil.pid_exists(before["broker_pid"])
    assert after["mqtt_port"] == before["mqtt_port"]
    assert after["filestore_pid"] == before["filestore_pid"]  # the file store was not touched
    assert psutil.Process(after["broker_pid"]).ppid() == net.proc.pid  # a child of `network start`, not a thread
    assert monitor_accepted(net)
    log = net.log_path.read_text()
    assert f"broker ({net.broker}) (pid {before['broker_pid']}) killed by SIGKILL" in log
    assert f"restarted (pid {after['broker_pid']}" in log
    restarts = after["restarts"]["broker"]
    assert restarts["count"] >= 1 and restarts["last_reason"] == "killed by SIGKILL"
    status = network_status(net)
    assert "killed by SIGKILL" in status and str(after["broker_pid"]) in status


def test_the_restarted_broker_accepts_a_party_added_afterwards(net: NetworkHandle) -> None:
    net.kill_broker()
    creds = net.add_party(f"late-{net.state['broker_pid']}", "node")  # reload_broker signals the new pid
    assert broker_accepts(creds.mqtt, timeout=5)


def test_a_broker_that_keeps_crashing_is_restarted_with_a_growing_pause(net: NetworkHandle) -> None:
    net.kill_broker()
    net.kill_broker()  # within STABLE_S of its start: the second crash in a row waits
    log = net.log_path.read_text()
    assert "restarting it in 0.5 s" in log or "restarting it in 1.0 s" in log
    assert monitor_accepted(net)


def test_a_killed_file_store_is_back_on_the_same_port(net: NetworkHandle) -> None:
    before = dict(net.state)
    net.kill_filestore()
    after = net.read_state()
    assert after["filestore_pid"] != before["filestore_pid"]
    assert after["http_port"] == before["http_port"]
    assert f"file store (pid {before['filestore_pid']}) killed by SIGKILL" in net.log_path.read_text()
    assert after["restarts"]["filestore"]["count"] == 1
    ref = _upload(net)
    assert ref.size == 5


def _upload(net: NetworkHandle):
    from fedsilo.common.config import Timeouts
    from fedsilo.network.filestore_client import FileStoreClient

    client = FileStoreClient(net.credentials("researcher").filestore, Timeouts())
    return client.upload_bytes(os.urandom(5))


# ---------------------------------------------------------------------------------------- network start dies
@pytest.mark.parametrize("broker", BROKERS)
def test_killing_network_start_takes_its_children_with_it(broker: str, tmp_path: Path) -> None:
    handle = start_network(tmp_path, broker=broker)
    try:
        state = handle.state
        handle.kill()
        wait_gone(children(state), [state["mqtt_port"], state["http_port"]])
    finally:
        handle.stop()


@pytest.mark.parametrize("broker", BROKERS)
def test_processes_left_by_a_dead_network_start_are_reported_and_stopped(broker: str, tmp_path: Path) -> None:
    handle = start_network(tmp_path, broker=broker, env={PDEATHSIG_ENV: "0"})  # children outlive their parent
    try:
        old = handle.state
        handle.kill()
        time.sleep(0.5)  # give them the time to die, if they were going to
        assert all(psutil.pid_exists(p) for p in children(old)), "the simulation failed: children died"
        assert not port_free(old["mqtt_port"])
        handle.start()
        log = handle.log_path.read_text()
        assert re.search(r"found [23] stale process\(es\) of this network", log)  # + the embedded broker's spare
        for pid in children(old):
            assert f"pid {pid} (" in log
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert (handle.state["mqtt_port"], handle.state["http_port"]) == (old["mqtt_port"], old["http_port"])
        assert monitor_accepted(handle)
    finally:
        handle.stop()


LISTENER = "import socket, sys, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
LISTENER += "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('listening', flush=True); time.sleep(600)"


def _listener(port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return start_process(
        [sys.executable, "-c", LISTENER, str(port), *extra],
        log,
        ready=lambda: "listening" in log.read_text(),
        timeout=20,
    )


def test_an_orphan_listener_of_this_network_is_cleared_but_a_stranger_is_not(tmp_path: Path) -> None:
    handle = start_network(tmp_path, broker="embedded")
    handle.stop()
    port = handle.state["mqtt_port"]
    ours = _listener(port, tmp_path / "ours.log", str(handle.netdir))  # names the network dir: one of ours
    paths = provision.network_paths(handle.netdir)
    paths.state.write_text(json.dumps({**handle.state, "pid": 2**22 + 1, "broker_pid": ours.pid}))
    try:
        handle.start()
        assert ours.wait(10) is not None
        assert f"pid {ours.pid} (" in handle.log_path.read_text()
        assert handle.state["mqtt_port"] == port
    finally:
        handle.stop()
        stop_process(ours)

    stranger = _listener(port, tmp_path / "stranger.log")  # same port, recorded too, but not this network's
    paths.state.write_text(json.dumps({**handle.state, "pid": 2**22 + 1, "broker_pid": stranger.pid}))
    try:
        with pytest.raises(RuntimeError, match=rf"cannot use 127.0.0.1:{port} .*used by pid {stranger.pid} "):
            handle.start(timeout=30)
        assert stranger.poll() is None
    finally:
        handle.stop()
        stranger.send_signal(signal.SIGKILL)
        stranger.wait(10)
