"""Run `fedsilo network start` as a child process and wait until it is ready (state.json written).

Tests crash its parts with `kill_broker()`, `kill_filestore()` (kill -9 of one child, which the network
restarts) and `kill()` (kill -9 of `network start` itself).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsilo.common.processes import FEDSILO, start_process, stop_process, wait_until

from . import provision
from .credentials import Credentials
from .filestore_client import store_healthy


@dataclass
class NetworkHandle:
    """A running network (broker + file store) process and its directory."""

    netdir: Path
    broker: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    state: dict = field(default_factory=dict)

    def credentials_path(self, party: str) -> Path:
        return provision.network_paths(self.netdir).credentials(party)

    def credentials(self, party: str = "researcher") -> Credentials:
        return Credentials.load(self.credentials_path(party))

    def add_party(self, name: str, role: str = "node") -> Credentials:
        """Register a party while the network runs (the broker reloads its users)."""
        return provision.add_party(self.netdir, name, role)

    @property
    def mqtt_port(self) -> int:
        return self.state["mqtt_port"]

    @property
    def filestore_url(self) -> str:
        return self.state["filestore_url"]

    @property
    def broker_kind(self) -> str:
        """The broker actually running (`auto` resolved)."""
        return self.state.get("broker", self.broker)

    def start(self, timeout: float = 60.0, extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        """Start `network start` and wait until it is ready; `env` adds environment variables."""
        paths = provision.network_paths(self.netdir)
        args = [*FEDSILO, "network", "start", "--dir", str(self.netdir), "--broker", self.broker]
        if not paths.config.is_file():
            args += ["--mqtt-port", "0", "--http-port", "0"]  # later starts reuse the ports in network.toml
        args += list(extra_args)
        self.proc = proc = start_process(args, self.log_path, env=env)

        def ready() -> bool:  # a `network start` killed earlier leaves its state.json: only ours counts
            state = provision.read_state(paths.root)
            return state is not None and state.get("pid") == proc.pid

        wait_until(ready, proc, self.log_path, timeout, "fedsilo network start")
        self.read_state()

    def read_state(self) -> dict:
        """Re-read state.json (the supervisor rewrites it with new pids after a restart)."""
        self.state = json.loads(provision.network_paths(self.netdir).state.read_text())
        return self.state

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        """kill -9 `network start` itself (its children get SIGTERM from the kernel: PR_SET_PDEATHSIG)."""
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGKILL)
            self.proc = None

    def kill_broker(self, wait: bool = True, timeout: float = 30.0) -> float:
        """kill -9 the broker; with `wait`, return once it is back (seconds from the kill), else 0."""
        return self._kill_child("broker_pid", self._broker_listening, wait, timeout)

    def kill_filestore(self, wait: bool = True, timeout: float = 60.0) -> float:
        """kill -9 the file store; with `wait`, return once it answers again (seconds from the kill), else 0."""
        return self._kill_child("filestore_pid", self._filestore_healthy, wait, timeout)

    def _kill_child(self, key: str, back: Callable[[], bool], wait: bool, timeout: float) -> float:
        assert self.proc is not None, "start() first"
        old = self.read_state()[key]
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        if not wait:
            return 0.0

        def restarted() -> bool:
            try:
                new = self.read_state()[key]
            except (OSError, ValueError, KeyError):  # between two writes, or being rewritten
                return False
            return new != old and back()

        # 5 ms polls: Mosquitto is back within ~40 ms, which a coarser poll would blur
        wait_until(restarted, self.proc, self.log_path, timeout, f"the network's {key[:-4]} restart", interval=0.005)
        return time.monotonic() - t0

    def _broker_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.mqtt_port), 0.5):
                return True
        except OSError:
            return False

    def _filestore_healthy(self) -> bool:
        return store_healthy(self.credentials(provision.MONITOR).filestore, f"{self.filestore_url}/api/v1/health")

    @property
    def ca_path(self) -> Path:
        """The network's CA certificate (what `requests`' verify= takes in tests that call the store by hand)."""
        return provision.network_paths(self.netdir).pki / "ca.crt"

    def restart(self, down_for: float = 0.0, timeout: float = 60.0) -> None:
        """Stop and start the whole network on the same ports (Mosquitto keeps its persisted sessions)."""
        self.stop()
        time.sleep(down_for)
        self.start(timeout=timeout)


def start_network(
    basedir: str | Path,
    broker: str = "auto",
    max_upload_mb: int | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> NetworkHandle:
    """Start a network in `basedir/network` on free ports (log in `basedir/network.log`); wait until ready."""
    netdir = Path(basedir) / "network"
    handle = NetworkHandle(netdir=netdir, broker=broker, log_path=Path(basedir) / "network.log")
    extra = ["--max-upload-mb", str(max_upload_mb)] if max_upload_mb else []
    handle.start(timeout=timeout, extra_args=extra, env=env)
    return handle
