"""Running the file store (uvicorn, see serve.py) as a child process of `fedsilo network start`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fedsilo.common.errors import ConfigError, FedsiloError
from fedsilo.common.processes import die_with_parent

from ..credentials import Credentials
from ..filestore_client import store_healthy
from ..provision import MONITOR, NetworkConfig, network_paths


class FileStoreError(FedsiloError):
    """The file store could not be started."""


def serve_command(netdir: str | Path) -> list[str]:
    return [sys.executable, "-m", "fedsilo.network.filestore.serve", str(network_paths(netdir).root)]


class FileStoreProcess:
    """The file store as a child process: `start(timeout)` waits until it answers its health check."""

    def __init__(self, netdir: str | Path, cfg: NetworkConfig, pdeathsig: int = signal.SIGTERM) -> None:
        self.paths = network_paths(netdir)
        self.cfg = cfg
        self.pdeathsig = pdeathsig  # 0: outlives its parent (tests of stale processes)
        self.log_path = self.paths.filestore_dir / "filestore.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    @property
    def health_url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        return f"{'https' if self.cfg.tls else 'http'}://{host}:{self.cfg.http_port}/api/v1/health"

    def start(self, timeout: float) -> None:
        self.paths.tmp.mkdir(parents=True, exist_ok=True)
        self.paths.blobs.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                serve_command(self.paths.root),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # pgid = pid: the supervisor kills orphaned workers with their group
                preexec_fn=die_with_parent(self.pdeathsig) if self.pdeathsig else None,
            )
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise FileStoreError(f"the file store exited at start-up; see {self.log_path}: {_tail(self.log_path)}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise FileStoreError(f"the file store did not answer within {timeout:.0f}s; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            probe = Credentials.load(self.paths.credentials(MONITOR)).filestore
        except ConfigError:
            return False
        # the probe party's TLS settings: the network's CA, and a client certificate for mutual TLS
        return store_healthy(probe, self.health_url)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it ended (negative: the signal that killed it); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()  # serve.py: SIGTERM closes the listener and exits
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
