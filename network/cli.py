"""`fedsilo network ...`: start the broker and the file store, manage parties, show status."""

from __future__ import annotations

import time
from typing import Any

import click

from fedsilo.common.clitools import friendly_errors, table
from fedsilo.common.errors import ConfigError

from . import provision
from .credentials import Credentials


@click.group()
def network() -> None:
    """Run the network (MQTT broker + file store) and manage who may join it."""


@network.command("start")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False), help="Network directory.")
@click.option(
    "--broker",
    type=click.Choice(["auto", "embedded", "mosquitto"]),
    default=None,
    help="MQTT broker (default: as stored, or auto = mosquitto when installed).",
)
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
    """Start the broker and the file store and keep them running (restarted when they crash);
    runs in the foreground until Ctrl-C or SIGTERM."""
    from .supervisor import run

    run(
        netdir,
        _summary,
        broker=broker,
        host=host,
        mqtt_port=mqtt_port,
        http_port=http_port,
        max_upload_mb=max_upload_mb,
    )


def _summary(paths: provision.NetworkPaths, cfg: provision.NetworkConfig) -> str:
    kind = cfg.broker
    researcher = paths.credentials(provision.DEFAULT_RESEARCHER)
    return "\n".join(
        [
            f"fedsilo network ready ({paths.root})",
            f"  broker      {kind} on {cfg.public_host}:{cfg.mqtt_port} (log: {paths.broker_dir / 'broker.log'})",
            f"  file store  {cfg.filestore_url} (max upload {cfg.max_upload_bytes // (1 << 20)} MiB)",
            f"  TLS         {'on, mutual' if cfg.mutual_tls else 'on'} (CA: {paths.pki / 'ca.crt'})"
            if cfg.tls
            else "  TLS         off (network.toml tls = false): passwords and tokens cross the network in clear",
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
    from .broker import broker_accepts
    from .filestore_client import store_healthy

    paths = provision.network_paths(netdir)
    cfg = provision.load_config(paths.root)
    state = provision.read_state(paths.root)
    if not state or not provision.pid_alive(state.get("pid")):
        click.echo(f"network in {paths.root}: not running (start it with `fedsilo network start --dir {netdir}`)")
        raise SystemExit(1)
    try:
        creds = Credentials.load(paths.credentials(provision.MONITOR))  # a party's own id would knock it off
        broker_ok = broker_accepts(creds.mqtt, timeout=2)
    except ConfigError:
        broker_ok = False
    try:
        store_ok = store_healthy(Credentials.load(paths.credentials(provision.MONITOR)).filestore, timeout=2)
    except ConfigError:
        store_ok = False
    restarts = state.get("restarts", {})
    rows = [
        (
            "broker",
            state["broker"],
            "up" if broker_ok else "DOWN",
            f"{cfg.public_host}:{state['mqtt_port']}",
            state.get("broker_pid"),
            *_restarts(restarts.get("broker")),
        ),
        (
            "file store",
            "uvicorn",
            "up" if store_ok else "DOWN",
            state.get("filestore_url"),
            state.get("filestore_pid"),
            *_restarts(restarts.get("filestore")),
        ),
    ]
    click.echo(f"network in {paths.root} (pid {state['pid']}), {len(provision.load_parties(paths.root))} parties")
    click.echo(table(["component", "kind", "state", "address", "pid", "restarts", "last restart"], rows))
    if not (broker_ok and store_ok):
        raise SystemExit(1)


def _restarts(record: dict[str, Any] | None) -> tuple[int, str]:
    """(count, "HH:MM:SS reason") of a supervised component's restarts, from state.json."""
    if not record or not record.get("count"):
        return 0, ""
    at = time.strftime("%H:%M:%S", time.localtime(record["last_at"])) if record.get("last_at") else "?"
    return record["count"], f"{at} after it was {record.get('last_reason') or '?'}"


@network.command("gc")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False), help="Network directory.")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@friendly_errors
def gc(netdir: str, dry_run: bool) -> None:
    """Remove file-store blobs unused for `retention_days` (network.toml); the running store also does it."""
    from .filestore.retention import run_gc

    click.echo(run_gc(netdir, dry_run=dry_run).render())
