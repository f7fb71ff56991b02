"""Running the file store: gunicorn (gthread workers) as a child process of `fedsilo network start`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from fedsilo.common.errors import FedsiloError

from ..provision import NetworkConfig, network_paths

WORKERS = 2
THREADS = 4


class FileStoreError(FedsiloError):
    """The file store could not be started."""


def gunicorn_command(netdir: str | Path, cfg: NetworkConfig) -> list[str]:
    paths = network_paths(netdir)
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gthread",
        "--workers",
        str(WORKERS),
        "--threads",
        str(THREADS),
        "--bind",
        f"{cfg.host}:{cfg.http_port}",
        "--preload",  # configure Django and migrate once, in the master
        "--timeout",
        "120",
        "--graceful-timeout",
        "10",
        "--keep-alive",
        "75",  # clients keep one session per party; do not drop it between rounds
        "--worker-tmp-dir",
        str(paths.tmp),
        "--error-logfile",
        str(paths.filestore_dir / "filestore.log"),
        "--log-level",
        "info",
        "--no-control-socket",  # its default path is per user, shared by every network on the machine
        "--name",
        "fedsilo-filestore",
        f"fedsilo.network.filestore.wsgi:create_app({str(paths.root)!r})",
    ]


class FileStoreProcess:
    def __init__(self, netdir: str | Path, cfg: NetworkConfig) -> None:
        self.paths = network_paths(netdir)
        self.cfg = cfg
        self.log_path = self.paths.filestore_dir / "filestore.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    @property
    def health_url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        return f"http://{host}:{self.cfg.http_port}/api/v1/health"

    def start(self, timeout: float) -> None:
        self.paths.tmp.mkdir(parents=True, exist_ok=True)
        self.paths.blobs.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                gunicorn_command(self.paths.root, self.cfg),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
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
            return requests.get(self.health_url, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()  # gunicorn: graceful shutdown of the workers
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
