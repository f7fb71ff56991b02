"""Which processes count as a network directory's own (network/stale.py), on real processes: a stale
start kills only those, never another network's or a stranger's."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedsilo.network.stale import belongs, find_stale

SLEEP = "import sys, time; print('up', flush=True); time.sleep(600)"


@pytest.fixture
def spawn() -> Iterator:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, stdout: Path | None = None) -> psutil.Process:
        out = open(stdout, "ab") if stdout else subprocess.PIPE  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-c", SLEEP, *args], stdout=out)
        procs.append(proc)
        if stdout is None:
            proc.stdout.readline()
        return psutil.Process(proc.pid)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_a_process_naming_the_directory_or_writing_inside_it_belongs(spawn, tmp_path: Path) -> None:
    root = tmp_path / "net"
    (root / "broker").mkdir(parents=True)
    assert belongs(spawn("--dir", str(root)), root)
    assert belongs(spawn("-c", f"{root}/broker/mosquitto.conf"), root)
    assert belongs(spawn(f"create_app('{root}')"), root)
    assert belongs(spawn(stdout=root / "broker" / "broker.log"), root)


def test_another_networks_directory_with_the_same_prefix_does_not_belong(spawn, tmp_path: Path) -> None:
    root = tmp_path / "net"
    other = tmp_path / "net2"
    (other / "broker").mkdir(parents=True)
    assert not belongs(spawn("--dir", str(other)), root)
    assert not belongs(spawn("-c", f"{other}/broker/mosquitto.conf"), root)
    assert not belongs(spawn(stdout=other / "broker" / "broker.log"), root)
    assert not belongs(spawn("--dir", str(tmp_path)), root)


def test_recorded_pids_that_are_not_the_networks_are_not_stale(spawn, tmp_path: Path) -> None:
    root = tmp_path / "net"
    ours, stranger = spawn("--dir", str(root)), spawn("--dir", str(tmp_path / "elsewhere"))
    state = {"pid": stranger.pid, "broker_pid": ours.pid, "filestore_pid": 2**22 + 7}
    assert [p.pid for p in find_stale(root, state, ports=[])] == [ours.pid]
