"""Processes left behind by a `fedsilo network start` that died without stopping its children.

Called only once the network directory's lock is ours: the lock being free proves that the process
that started them is dead, so whatever of *this* network still runs is stale. A process counts as
this network's when it is recorded in `state.json` or listens on one of its ports, *and* its command
line names the network directory or it writes to a file inside it (a broker's or the store's log);
its process-group members that pass the same test go with it (gunicorn workers of a dead master).
A process on the port that does not belong to the network is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil


def belongs(proc: psutil.Process, root: Path) -> bool:
    """Whether `proc`'s command line names `root`, or one of its open files is inside it.

    `root` must be a whole path there: `/srv/net` does not name `/srv/net2`, another network's directory.
    """
    named = re.compile(re.escape(str(root)) + r"(?![^/'\"\s,)])")  # followed by /, a quote, a space or the end
    try:
        if any(named.search(arg) for arg in proc.cmdline()):
            return True
        return any(named.match(f.path) for f in proc.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def listeners(ports: Iterable[int]) -> set[int]:
    """Pids of this user's processes listening on any of `ports` (TCP, IPv4 or IPv6)."""
    wanted = set(ports)
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return set()
    return {c.pid for c in conns if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in wanted}


def find_stale(root: Path, state: dict[str, Any] | None, ports: Iterable[int]) -> list[psutil.Process]:
    """This network's processes still running (see the module docstring); never this process."""
    recorded = [(state or {}).get(key) for key in ("pid", "broker_pid", "filestore_pid")]
    candidates = {pid for pid in recorded if isinstance(pid, int)}
    candidates |= listeners(ports)
    found: dict[int, psutil.Process] = {}
    for pid in candidates:
        try:
            proc = psutil.Process(pid)
            group = os.getpgid(pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
        if not belongs(proc, root):
            continue
        found[pid] = proc
        for other in psutil.process_iter():
            try:
                if other.pid not in found and os.getpgid(other.pid) == group and belongs(other, root):
                    found[other.pid] = other
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
    found.pop(os.getpid(), None)
    return sorted(found.values(), key=lambda p: p.pid)


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes of `pids` that still exist."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def describe(proc: psutil.Process) -> str:
    """`pid 123 (mosquitto -c /net/broker/mosquitto.conf)`, shortened."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        cmd = "?"
    return f"pid {proc.pid} ({cmd if len(cmd) <= 120 else cmd[:117] + '...'})"


def stop_all(procs: list[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGTERM each, SIGKILL those still there after `timeout`; return the ones that would not die."""
    for sig_send in (psutil.Process.terminate, psutil.Process.kill):
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                sig_send(proc)
        procs = _wait_gone(procs, timeout)
        if not procs:
            break
    return procs


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still running after up to `timeout` s (a zombie counts as gone: it holds no port)."""
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in procs if not _gone(p)]
        if not procs or time.monotonic() > deadline:
            return procs
        time.sleep(0.02)


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
