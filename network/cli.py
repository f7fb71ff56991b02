"""`fedsilo network ...`: start the broker and the file store, manage parties, show status."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import click
from filelock import FileLock, Timeout

from fedsilo.common.clitools import friendly_errors, table
from fedsilo.common.errors import ConfigError

from . import provision
from .credentials import Credentials


@click.group()
def network() -> None:
    """Run the network (MQTT broker + file store) and manage who may join it."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "", 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot use {host}:{port} ({exc.strerror}); another broker or network may be running; "
                f"choose another port with {option}, or {option} 0 for a free one"
            ) from None


class _Stop(Exception):
    """Raised from the signal handler so that a stop request interrupts start-up too."""


@network.command("start")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False), help="Network directory.")
@click.option("--broker", type=click.Choice(["auto", "embedded", "mosquitto"]), default=None,
              help="MQTT broker (default: as stored, or auto = mosquitto when installed).")
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--mqtt-port", type=click.IntRange(0, 65535), default=None, help="MQTT port (0 = a free one).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None, help="File store port (0 = a free one).")
@click.option("--max-upload-mb", type=click.IntRange(min=1), default=None, help="Largest blob accepted, in MiB.")
@friendly_errors
def start(
    netdir: str,
    broker: str | None,
    host: str | None,
    mqtt_port: int | None,
    http_port: int | None,
    max_upload_mb: int | None,
) -> None:
    """Start the broker and the file store; runs in the foreground until Ctrl-C or SIGTERM."""
    from .broker import broker_accepts, make_broker, resolve_kind
    from .filestore.server import FileStoreProcess

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
    running: list[Any] = []
    code = 0
    try:
        provision.remove_state(paths.root)  # a stale file from a killed run must not look ready
        old = provision.load_config(paths.root) if paths.config.is_file() else None
        kind = resolve_kind(broker or (old.broker if old else "auto"))
        bind_host = host or (old.host if old else "127.0.0.1")
        ports = {}
        for name, given, default, option in (
            ("mqtt", mqtt_port, 1883, "--mqtt-port"),
            ("http", http_port, 8800, "--http-port"),
        ):
            port = given if given is not None else (getattr(old, f"{name}_port") if old else default)
            if port == 0:
                port = free_port(bind_host)
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
        provision.write_broker_files(paths.root)

        mqtt = make_broker(paths.root, cfg)
        running.append(mqtt)
        mqtt.start(timeout=15)
        store = FileStoreProcess(paths.root, cfg)
        running.append(store)
        store.start(timeout=60)
        researcher = Credentials.load(paths.credentials(provision.DEFAULT_RESEARCHER))
        if not broker_accepts(researcher.mqtt, timeout=5):
            raise ConfigError(f"the broker does not accept the researcher's credentials; see {mqtt.log_path}")
        provision.write_state(
            paths.root,
            {
                "pid": os.getpid(),
                "broker": mqtt.kind,
                "broker_pid": mqtt.pid,
                "filestore_pid": store.pid,
                "host": cfg.host,
                "mqtt_port": cfg.mqtt_port,
                "http_port": cfg.http_port,
                "filestore_url": cfg.filestore_url,
                "started_at": time.time(),
            },
        )
        click.echo(_summary(paths, cfg, mqtt.kind))
        while True:
            time.sleep(0.5)
            if not mqtt.alive():
                click.echo(f"error: the broker stopped unexpectedly; see {mqtt.log_path}", err=True)
                code = 1
                break
            if not store.alive():
                click.echo(f"error: the file store stopped unexpectedly; see {store.log_path}", err=True)
                code = 1
                break
    except _Stop:
        pass
    finally:
        stopping = True
        provision.remove_state(paths.root)
        for component in reversed(running):
            component.stop()
        lock.release()
    if running and code == 0:
        click.echo("network stopped")
    if code:
        raise SystemExit(code)


def _summary(paths: provision.NetworkPaths, cfg: provision.NetworkConfig, kind: str) -> str:
    researcher = paths.credentials(provision.DEFAULT_RESEARCHER)
    return "\n".join(
        [
            f"fedsilo network ready ({paths.root})",
            f"  broker      {kind} on {cfg.public_host}:{cfg.mqtt_port} (log: {paths.broker_dir / 'broker.log'})",
            f"  file store  {cfg.filestore_url} (max upload {cfg.max_upload_bytes // (1 << 20)} MiB)",
            f"  researcher  credentials in {researcher}",
            f"  add a node: fedsilo network party add NAME --role node --dir {paths.root}",
            "  stop with Ctrl-C",
        ]
    )


@network.group()
def party() -> None:
    """Parties (nodes, researchers) allowed on the network."""


@party.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["node", "researcher"]), required=True)
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False), help="Network directory.")
@friendly_errors
def party_add(name: str, role: str, netdir: str) -> None:
    """Register a party and write its credentials file."""
    creds = provision.add_party(netdir, name, role)
    path = provision.network_paths(netdir).credentials(creds.party)
    click.echo(f"added {role} '{name}'; credentials written to {path}")
    if role == "node":
        click.echo(f"give that file to the node's administrator: fedsilo node init --name {name} --network {path}")


@party.command("list")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False), help="Network directory.")
@friendly_errors
def party_list(netdir: str) -> None:
    """List the registered parties."""
    paths = provision.network_paths(netdir)
    provision.load_config(paths.root)
    rows = [
        (name, p["role"], p.get("created_at", ""), paths.credentials(name))
        for name, p in sorted(provision.load_parties(paths.root).items())
    ]
    click.echo(table(["name", "role", "created", "credentials"], rows, max_width=100))


@network.command("status")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False), help="Network directory.")
@friendly_errors
def status(netdir: str) -> None:
    """Whether the network in DIR runs, and whether its broker and file store answer."""
    import requests

    from .broker import broker_accepts

    paths = provision.network_paths(netdir)
    cfg = provision.load_config(paths.root)
    state = provision.read_state(paths.root)
    if not state or not provision.pid_alive(state.get("pid")):
        click.echo(f"network in {paths.root}: not running (start it with `fedsilo network start --dir {netdir}`)")
        raise SystemExit(1)
    try:
        creds = Credentials.load(paths.credentials(provision.DEFAULT_RESEARCHER))
        broker_ok = broker_accepts(creds.mqtt, timeout=2)
    except ConfigError:
        broker_ok = False
    try:
        store_ok = requests.get(f"{cfg.filestore_url}/api/v1/health", timeout=2).status_code == 200
    except requests.RequestException:
        store_ok = False
    rows = [
        ("broker", state["broker"], "up" if broker_ok else "DOWN", f"{cfg.public_host}:{state['mqtt_port']}",
         state.get("broker_pid")),
        ("file store", "gunicorn", "up" if store_ok else "DOWN", state.get("filestore_url"),
         state.get("filestore_pid")),
    ]
    click.echo(f"network in {paths.root} (pid {state['pid']}), {len(provision.load_parties(paths.root))} parties")
    click.echo(table(["component", "kind", "state", "address", "pid"], rows))
    if not (broker_ok and store_ok):
        raise SystemExit(1)

