"""The MQTT broker as a child process of `fedsilo network start`: Mosquitto, or the embedded amqtt broker.

Both run the same way (own process group, output in `NETDIR/broker/broker.log`, SIGTERM when their
parent dies), so that a crash of either means the same thing and the supervisor restarts either on
the same port. Configuration and authentication live in `broker.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fedsilo.common.processes import ChildProcess, log_tail

from .broker import BrokerError, BrokerKind, mosquitto_conf
from .provision import NetworkConfig, network_paths, write_broker_files


class RunningBroker(Protocol):
    kind: BrokerKind
    pid: int
    log_path: Path

    def start(self, timeout: float) -> None: ...
    def alive(self) -> bool: ...
    def stop(self) -> None: ...


def make_broker(netdir: str | Path, cfg: NetworkConfig, pdeathsig: int = signal.SIGTERM) -> RunningBroker:
    """The broker `cfg.broker` names, not started yet; `pdeathsig` 0 lets it outlive its parent (tests)."""
    if cfg.broker == "mosquitto":
        return MosquittoBroker(netdir, cfg, pdeathsig)
    return EmbeddedBroker(netdir, cfg, pdeathsig)


class BrokerFactory:
    """Makes the broker for each (re)start of the network's broker.

    For the embedded broker it keeps a spare process warm (`warm()`): Python has started and amqtt is
    imported, and it only waits for the word to listen. Starting cold takes 0.3 s on an idle 2-core
    machine but 1-3 s while it runs a test suite (load 14: import 1.0-3.0 s, measured 2026-11-30);
    the spare listens within milliseconds. Mosquitto starts in ~10 ms and needs none.
    """

    def __init__(self, netdir: str | Path, cfg: NetworkConfig, pdeathsig: int = signal.SIGTERM) -> None:
        self.netdir = netdir
        self.cfg = cfg
        self.pdeathsig = pdeathsig
        self.spare: EmbeddedBroker | None = None

    def __call__(self) -> RunningBroker:
        broker = make_broker(self.netdir, self.cfg, self.pdeathsig)
        if isinstance(broker, EmbeddedBroker) and self.spare is not None and self.spare.alive():
            broker.adopt(self.spare)
        self.spare = None
        return broker

    def warm(self) -> None:
        """Have a spare ready for the next start (embedded broker only; no wait)."""
        if self.cfg.broker == "embedded" and (self.spare is None or not self.spare.alive()):
            self.spare = EmbeddedBroker(self.netdir, self.cfg, self.pdeathsig)
            self.spare.spawn_waiting()

    def close(self) -> None:
        if self.spare is not None:
            self.spare.stop()
            self.spare = None


def wait_listening(host: str, port: int, timeout: float, alive: Callable[[], bool], log_path: Path) -> None:
    """Poll until `host:port` accepts TCP connections; raise with the log's tail if the process exits."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerError(f"the broker exited at start-up: {log_tail(log_path, 5)}")
        try:
            with socket.create_connection((target, port), 0.5):
                return
        except OSError:
            time.sleep(0.02)  # mosquitto listens within ~10 ms: a coarse poll would dominate a restart
    raise BrokerError(f"the broker did not listen on {host}:{port} within {timeout:.0f}s: {log_tail(log_path, 5)}")


class _BrokerProcess(ChildProcess):
    """Common part of both brokers: a child process that is ready once its port accepts connections."""

    kind: BrokerKind

    def __init__(self, netdir: str | Path, cfg: NetworkConfig, pdeathsig: int = signal.SIGTERM) -> None:
        self.paths = network_paths(netdir)
        self.cfg = cfg
        self.pdeathsig = pdeathsig
        super().__init__(self.paths.broker_dir / "broker.log")

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float) -> None:
        self.paths.broker_dir.mkdir(parents=True, exist_ok=True)
        self.spawn(self.command(), pdeathsig=self.pdeathsig)
        wait_listening(self.cfg.host, self.cfg.mqtt_port, timeout, self.alive, self.log_path)


class MosquittoBroker(_BrokerProcess):
    """Mosquitto with the generated configuration (passwords, ACL) of the network directory."""

    kind: BrokerKind = "mosquitto"

    def command(self) -> list[str]:
        binary = shutil.which("mosquitto")
        if binary is None:
            raise BrokerError("mosquitto is not installed (or not on PATH); use --broker embedded")
        write_broker_files(self.paths.root)
        conf = self.paths.broker_dir / "mosquitto.conf"
        conf.write_text(mosquitto_conf(self.paths.root, self.cfg), encoding="utf-8")
        os.chmod(conf, 0o600)
        return [binary, "-c", str(conf)]

    def reload(self) -> None:
        """Make it re-read the password and ACL files."""
        if self.alive():
            os.kill(self.pid, signal.SIGHUP)


class EmbeddedBroker(_BrokerProcess):
    """The amqtt broker in its own Python process (`fedsilo.network.embedded_broker --standby`).

    The process starts waiting on its stdin and listens once told `go` (see `BrokerFactory`). It
    re-reads `parties.json` when the file changes, so a new party needs no reload.
    """

    kind: BrokerKind = "embedded"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedsilo.network.embedded_broker", "--dir", str(self.paths.root), "--standby"]

    def spawn_waiting(self) -> None:
        """Start the process, which then waits (imports done) for `go` on its stdin."""
        self.spawn(self.command(), pdeathsig=self.pdeathsig, stdin=subprocess.PIPE)

    def adopt(self, spare: EmbeddedBroker) -> None:
        """Take over a waiting spare process instead of starting one."""
        self._proc, self.pid = spare._proc, spare.pid
        spare._proc = None

    def start(self, timeout: float) -> None:
        if self._proc is None:
            self.spawn_waiting()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(b"go\n")
            self._proc.stdin.close()
        except BrokenPipeError:  # it died while waiting: wait_listening reports it with the log
            pass
        wait_listening(self.cfg.host, self.cfg.mqtt_port, timeout, self.alive, self.log_path)
