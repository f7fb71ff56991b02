"""Run `fedsilo network start` as a child process and wait until it is ready (state.json written)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsilo.common.processes import FEDSILO, start_process, stop_process

from . import provision
from .credentials import Credentials


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

    def start(self, timeout: float = 60.0, extra_args: Sequence[str] = ()) -> None:
        paths = provision.network_paths(self.netdir)
        args = [*FEDSILO, "network", "start", "--dir", str(self.netdir), "--broker", self.broker]
        if not paths.config.is_file():
            args += ["--mqtt-port", "0", "--http-port", "0"]  # later starts reuse the ports in network.toml
        args += list(extra_args)
        self.proc = start_process(args, self.log_path, ready=paths.state.is_file, timeout=timeout)
        self.state = json.loads(paths.state.read_text())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start the whole network on the same ports (the broker loses its sessions)."""
        self.stop()
        time.sleep(down_for)
        self.start()


def start_network(
    basedir: str | Path,
    broker: str = "auto",
    max_upload_mb: int | None = None,
    timeout: float = 60.0,
) -> NetworkHandle:
    """Start a network in `basedir/network` on free ports (log in `basedir/network.log`); wait until ready."""
    netdir = Path(basedir) / "network"
    handle = NetworkHandle(netdir=netdir, broker=broker, log_path=Path(basedir) / "network.log")
    extra = ["--max-upload-mb", str(max_upload_mb)] if max_upload_mb else []
    handle.start(timeout=timeout, extra_args=extra)
    return handle
