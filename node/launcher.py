"""Run `fedsilo node start` as a child process; ready once the daemon reports a broker connection."""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedsilo.common.processes import FEDSILO, start_process, stop_process, wait_until

from .config import node_paths


def daemon_connected(nodedir: str | Path, pid: int | None = None) -> bool:
    """True when the node's status.json says its daemon (process `pid`, when given) is connected to the broker.

    A daemon that was killed leaves its status.json behind, still saying connected: `pid` tells a
    restarted daemon's status from the dead one's.
    """
    try:
        status = json.loads(node_paths(nodedir).status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if pid is not None and status.get("pid") != pid:
        return False
    return bool(status.get("broker_connected"))


@dataclass
class NodeHandle:
    """A node daemon process and its node directory."""

    nodedir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0, wait: bool = True) -> None:
        self.proc = start_process([*FEDSILO, "node", "start", "--dir", str(self.nodedir)], self.log_path)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        assert self.proc is not None, "start() first"
        pid = self.proc.pid  # `fedsilo node start` runs the daemon in this very process
        wait_until(
            lambda: daemon_connected(self.nodedir, pid), self.proc, self.log_path, timeout, f"node {self.nodedir}"
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the daemon (SIGKILL simulates a crash: no farewell, queue left as it was)."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout=30, sig=sig)
        self.proc = None
        return code


def start_node(nodedir: str | Path, log_path: str | Path | None = None, timeout: float = 90.0) -> NodeHandle:
    """Start the daemon of an initialised node directory and wait until it is connected."""
    nodedir = Path(nodedir)
    handle = NodeHandle(nodedir=nodedir, log_path=Path(log_path or nodedir / "logs" / "daemon.out"))
    handle.start(timeout=timeout)
    return handle
