"""Run fedsilo processes from tests: a network (`fedsilo network start`) and generic daemons.

    net = start_network(tmp_path)            # free ports, waits until state.json says READY
    creds = net.credentials("researcher")    # fedsilo.network.credentials.Credentials
    node = net.add_party("n1", "node")
    net.stop()

`start_process`/`stop_process` run any command with its output in a log file and a readiness check;
node helpers build on them. A process that fails to get ready raises with the tail of its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsilo.network import provision
from fedsilo.network.credentials import Credentials

FEDSILO = [sys.executable, "-c", "from fedsilo.common.cli import main; main()"]
"""The `fedsilo` command, run by the interpreter running the tests (no PATH lookup)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_process(
    args: Sequence[str],
    log_path: str | Path,
    ready: Callable[[], bool] | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `args` with stdout+stderr in `log_path`; wait until `ready()` is true (polled)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            start_new_session=True,  # a stop signal goes to the whole process group
        )
    if ready is None:
        return proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{' '.join(args[:6])} exited with {proc.returncode} before it was ready; log {log_path}:\n"
                + log_tail(log_path)
            )
        if ready():
            return proc
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{' '.join(args[:6])} not ready after {timeout:.0f}s; log {log_path}:\n" + log_tail(log_path))


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
    """Ask the process to stop (SIGTERM), kill its group when it does not; return its exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
    return proc.returncode


@dataclass
class NetworkHandle:
    """A running `fedsilo network start` subprocess and its directory."""

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

    def start(self, timeout: float = 60.0, extra_args: Sequence[str] = ()) -> None:
        state_file = provision.network_paths(self.netdir).state
        first = not provision.network_paths(self.netdir).config.is_file()
        args = [*FEDSILO, "network", "start", "--dir", str(self.netdir), "--broker", self.broker]
        if first:
            args += ["--mqtt-port", "0", "--http-port", "0"]  # later starts reuse the ports in network.toml
        args += list(extra_args)
        self.proc = start_process(args, self.log_path, ready=state_file.is_file, timeout=timeout)
        self.state = json.loads(state_file.read_text())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart_broker(self, down_for: float = 0.0) -> None:
        """Stop and start the whole network on the same ports (the broker loses its sessions)."""
        self.stop()
        time.sleep(down_for)
        self.start()


def start_network(
    tmpdir: str | Path,
    broker: str = "auto",
    max_upload_mb: int | None = None,
    timeout: float = 60.0,
) -> NetworkHandle:
    """Start a network in `tmpdir/network` on free ports and wait until it is ready."""
    netdir = Path(tmpdir) / "network"
    handle = NetworkHandle(netdir=netdir, broker=broker, log_path=Path(tmpdir) / "network.log")
    extra = ["--max-upload-mb", str(max_upload_mb)] if max_upload_mb else []
    handle.start(timeout=timeout, extra_args=extra)
    return handle
