"""`fedsilo network start`: run the broker and the file store as supervised child processes.

- A child that dies is restarted on the same port: at once after a crash that follows a stable run,
  then with a doubling pause (`backoff`) while it keeps crashing. Each restart is logged (stderr, the
  network log), and `state.json` gets the new pid, a restart count and the last reason, which
  `fedsilo network status` shows.
- The children die with this process (PR_SET_PDEATHSIG: the kernel signals them even after a
  SIGKILL here); what they forked goes with their process group.
- A start whose directory lock is free while processes of this network still run (a `network start`
  killed where PDEATHSIG could not help) reports and stops them (`stale.py`) instead of failing on
  the port.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fedsilo.common.errors import ConfigError
from fedsilo.common.processes import exit_reason, free_port, kill_group

from . import pki, provision, roster, stale
from .credentials import Credentials

log = logging.getLogger("fedsilo.network.supervisor")

STABLE_S = 30.0
"""A child that ran this long before it died counts as a fresh crash (restarted at once)."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
POLL_S = 0.05
"""How often children are checked (a waitpid each): the part of the ~0.1 s broker downtime that is ours."""
PDEATHSIG_ENV = "FEDSILO_NETWORK_PDEATHSIG"
"""Set to 0 to let the children outlive `network start` (tests simulate stale processes with it)."""


def backoff(failures: int) -> float:
    """Seconds to wait before restarting a child that crashed `failures` times in a row."""
    return 0.0 if failures <= 1 else min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 2))


@dataclass
class Supervised:
    """One supervised child (the broker or the file store) and its restart record."""

    key: str  # "broker" or "filestore" in state.json
    label: str
    make: Callable[[], Any]  # a new, unstarted component: start(timeout), alive(), stop(), pid, log_path
    start_timeout: float
    warm: Callable[[], None] | None = None  # after each start: prepare what makes the next one fast
    close: Callable[[], None] | None = None  # on stop: release what `warm` prepared
    proc: Any = None
    started_at: float = 0.0
    restarts: int = 0
    last_reason: str | None = None
    last_restart_at: float | None = None
    failures: int = 0
    died_at: float | None = None
    retry_at: float | None = None

    def start(self) -> None:
        self.proc = self.make()
        self.proc.start(timeout=self.start_timeout)
        self.started_at = time.monotonic()
        if self.warm is not None:
            self.warm()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.close is not None:
            self.close()

    def record(self) -> dict[str, Any]:
        return {"count": self.restarts, "last_reason": self.last_reason, "last_at": self.last_restart_at}


def network_children(paths: provision.NetworkPaths, cfg: provision.NetworkConfig) -> list[Supervised]:
    """The broker and the file store of the network in `paths`, as supervised children (not started)."""
    from .broker_process import BrokerFactory
    from .filestore.server import FileStoreProcess

    sig = signal.SIGTERM if os.environ.get(PDEATHSIG_ENV, "1") != "0" else 0
    brokers = BrokerFactory(paths.root, cfg, sig)
    return [
        Supervised("broker", f"broker ({cfg.broker})", brokers, 15, warm=brokers.warm, close=brokers.close),
        Supervised("filestore", "file store", lambda: FileStoreProcess(paths.root, cfg, sig), 60),
    ]


def check_probe(paths: provision.NetworkPaths) -> None:
    """Raise unless the running broker accepts the network's probe party (passwords and ACL loaded)."""
    from .broker import broker_accepts

    monitor = Credentials.load(paths.credentials(provision.MONITOR))
    if not broker_accepts(monitor.mqtt, timeout=5):
        raise ConfigError(f"the broker does not accept the network's probe credentials; see {paths.broker_dir}")


class _Stop(Exception):
    """Raised from the signal handler so that a stop request interrupts start-up and restarts too."""


class Supervisor:
    """Starts the children, watches them, restarts them, keeps `state.json` current."""

    def __init__(
        self, paths: provision.NetworkPaths, cfg: provision.NetworkConfig, children: list[Supervised] | None = None
    ) -> None:
        self.paths = paths
        self.cfg = cfg
        self.children = network_children(paths, cfg) if children is None else children
        self.started_at = time.time()
        self.roster_publisher = roster.RosterPublisher(paths.root)

    def start(self) -> None:
        """Start every child (not yet announced: `write_state` says the network is ready)."""
        for child in self.children:
            child.start()

    def write_state(self) -> None:
        provision.write_state(
            self.paths.root,
            {
                "pid": os.getpid(),
                "broker": self.cfg.broker,
                **{f"{c.key}_pid": c.proc.pid for c in self.children},
                "host": self.cfg.host,
                "mqtt_port": self.cfg.mqtt_port,
                "http_port": self.cfg.http_port,
                "filestore_url": self.cfg.filestore_url,
                "started_at": self.started_at,
                "restarts": {c.key: c.record() for c in self.children},
            },
        )

    def watch(self) -> None:
        """Check and restart the children until a signal stops this process."""
        while True:
            time.sleep(POLL_S)
            for child in self.children:
                self.check(child)

    def check(self, child: Supervised) -> None:
        now = time.monotonic()
        if child.retry_at is None:
            if child.proc.alive():
                return
            pid = child.proc.pid
            child.last_reason = exit_reason(child.proc.returncode)
            child.proc.stop()
            kill_group(pid)  # what it forked (e.g. gunicorn's workers) would keep its port
            child.died_at = now
            child.failures = 1 if now - child.started_at >= STABLE_S else child.failures + 1
            child.retry_at = now + backoff(child.failures)
            log.warning(
                "%s (pid %d) %s; restarting it %s (see %s)",
                child.label,
                pid,
                child.last_reason,
                _when(child.retry_at - now),
                child.proc.log_path,
            )
        if now < child.retry_at:
            return
        try:
            child.start()
        except Exception as exc:  # a failed restart is retried with backoff; the network stays up
            child.proc.stop()  # one that hangs at start-up must not keep the port from the next try
            kill_group(child.proc.pid)
            child.failures += 1
            child.retry_at = time.monotonic() + backoff(child.failures)
            child.last_reason = f"restart failed: {exc}"
            log.error(
                "%s could not be restarted: %s; next try %s", child.label, exc, _when(child.retry_at - time.monotonic())
            )
            self.write_state()
            return
        child.restarts += 1
        child.last_restart_at = time.time()
        child.retry_at = None
        down = time.monotonic() - (child.died_at or now)
        log.warning(
            "%s restarted (pid %d, restart %d), back %.2f s after it died",
            child.label,
            child.proc.pid,
            child.restarts,
            down,
        )
        self.write_state()
        if child.key == "broker":  # the embedded broker keeps no retained message across a restart
            self.roster_publisher.request()

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _when(delay: float) -> str:
    return "now" if delay <= 0 else f"in {delay:.1f} s"


def _check_port_free(host: str, port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            users = ", ".join(stale.describe(p) for p in stale.processes(stale.listeners([port]))) or "unknown"
            raise ConfigError(
                f"cannot use {host}:{port} ({exc.strerror}; used by {users}, not part of this network); "
                f"choose another port with {option}, or {option} 0 for a free one"
            ) from None


def clear_stale(paths: provision.NetworkPaths, ports: set[int]) -> None:
    """Stop what a dead `network start` of this directory left running (see `stale.py`); log it."""
    found = stale.find_stale(paths.root, provision.read_state(paths.root), ports)
    if not found:
        return
    log.warning(
        "found %d stale process(es) of this network, left by a `network start` that is gone (its lock is free): %s; "
        "stopping them",
        len(found),
        "; ".join(stale.describe(p) for p in found),
    )
    left = stale.stop_all(found)
    if left:
        names = ", ".join(stale.describe(p) for p in left)
        raise ConfigError(f"could not stop stale processes of {paths.root}: {names}")
    log.warning("stopped %d stale process(es)", len(found))


def prepare(
    paths: provision.NetworkPaths,
    broker: str | None,
    host: str | None,
    mqtt_port: int | None,
    http_port: int | None,
    max_upload_mb: int | None,
) -> provision.NetworkConfig:
    """Clear stale processes, settle the ports (0 = a free one), write network.toml and broker files."""
    from .broker import resolve_kind

    old = provision.load_config(paths.root) if paths.config.is_file() else None
    clear_stale(paths, {p for p in (mqtt_port, http_port, old and old.mqtt_port, old and old.http_port) if p})
    provision.remove_state(paths.root)  # a stale file from a killed run must not look ready
    kind = resolve_kind(broker or (old.broker if old else "auto"))
    bind_host = host or (old.host if old else "127.0.0.1")
    ports = {}
    for name, given, default, option in (
        ("mqtt", mqtt_port, 1883, "--mqtt-port"),
        ("http", http_port, 8800, "--http-port"),
    ):
        port = given if given is not None else (getattr(old, f"{name}_port") if old else default)
        if port == 0:
            port = free_port(bind_host if bind_host not in ("0.0.0.0", "") else "")
        else:
            _check_port_free(bind_host, port, option)
        ports[name] = port
    cfg = provision.init_network(
        paths.root,
        host=bind_host,
        mqtt_port=ports["mqtt"],
        http_port=ports["http"],
        broker=kind,
        max_upload_bytes=max_upload_mb * (1 << 20) if max_upload_mb else None,
    )
    if provision.DEFAULT_RESEARCHER not in provision.load_parties(paths.root):
        provision.add_party(paths.root, provision.DEFAULT_RESEARCHER, "researcher")
    provision.ensure_monitor(paths.root)  # before the broker starts: mosquitto reads its passwords once
    if cfg.tls:  # the servers' certificate, re-issued when the host changed
        pki.ensure_server(paths.pki, [cfg.host, cfg.public_host])
    provision.write_broker_files(paths.root)
    roster.ensure_keys(paths.root, paths.credentials_dir)  # directories made before messages were signed
    return cfg


def run(
    netdir: str | Path, summary: Callable[[provision.NetworkPaths, provision.NetworkConfig], str], **options: Any
) -> None:
    """Run the network in the foreground until SIGINT/SIGTERM (`fedsilo network start`).

    `options` are `prepare`'s. Prints `summary(paths, cfg)` once ready.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s network: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    paths = provision.network_paths(netdir)
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(paths.root / ".network.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        state = provision.read_state(paths.root) or {}
        raise ConfigError(
            f"a network is already running from {paths.root} (pid {state.get('pid', '?')}); stop it first"
        ) from None

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        if not stopping:
            raise _Stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor: Supervisor | None = None
    try:
        cfg = prepare(paths, **options)
        supervisor = Supervisor(paths, cfg)
        supervisor.start()
        check_probe(paths)
        roster.publish_roster(paths.root)  # retained: parties learn of parties made after their credentials
        supervisor.write_state()
        print(summary(paths, cfg), flush=True)
        supervisor.watch()
    except _Stop:
        pass
    finally:
        stopping = True
        provision.remove_state(paths.root)
        if supervisor is not None:
            supervisor.stop()
        lock.release()
    if supervisor is not None:
        print("network stopped", flush=True)
