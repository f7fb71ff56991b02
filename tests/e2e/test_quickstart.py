"""`scripts/quickstart.py` beside a network that is already running: an explicit port that is taken
stops it at once with what to do; by default it falls back to free ports (with a message) and runs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support.procs import NetworkHandle, start_network

QUICKSTART = REPO / "scripts" / "quickstart.py"


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = start_network(tmp_path_factory.mktemp("other"), broker="embedded")
    yield handle
    handle.stop()


@contextlib.contextmanager
def holding(*ports: int) -> Iterator[None]:
    """Listen on `ports` (those free now) so that the quickstart's default ports are taken for sure."""
    with contextlib.ExitStack() as stack:
        for port in ports:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            with contextlib.suppress(OSError):  # already held by someone else: taken all the same
                s.bind(("127.0.0.1", port))
                s.listen()
        yield


def _quickstart(tmp: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(QUICKSTART), "--dir", str(tmp / "qs"), "--rounds", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_a_taken_port_is_refused_with_advice(other: NetworkHandle, tmp_path: Path) -> None:
    out = _quickstart(tmp_path, "--mqtt-port", str(other.mqtt_port), timeout=120)
    assert out.returncode != 0
    assert f"--mqtt-port {other.mqtt_port}: the port is in use" in out.stderr
    assert "--mqtt-port 0 for a free one" in out.stderr
    assert other.proc is not None and other.proc.poll() is None  # the running network is untouched


def test_default_ports_taken_fall_back_to_free_ones(other: NetworkHandle, tmp_path: Path) -> None:
    with holding(1883, 8800):
        out = _quickstart(tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "port 1883 is in use" in out.stdout and "port 8800 is in use" in out.stdout
    assert "demo done" in out.stdout
    assert other.proc is not None and other.proc.poll() is None
