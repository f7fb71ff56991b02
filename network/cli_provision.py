"""`fedsilo provision ...`: a consortium CA, the parties and one startup kit per party.

    fedsilo provision --dir NET --nodes a,b,c --researchers r1     # CA, parties, NET/kits/<party>{/,.tar.gz}
    fedsilo provision add --dir NET --node d --researcher r2       # later parties
    fedsilo provision csr --name e --out SITE                      # on the site: SITE/e.key stays there
    fedsilo provision sign --dir NET --csr e.csr --role node       # at the provisioner: a kit without the key
    fedsilo provision accept --kit e.tar.gz --key SITE/e.key --out SITE/kit   # on the site
"""

from __future__ import annotations

from pathlib import Path

import click

from fedsilo.common.clitools import friendly_errors, table
from fedsilo.common.errors import ConfigError

from . import kits, pki
from . import provision as netprov

NET_DIR = click.option("--dir", "netdir", type=click.Path(file_okay=False, path_type=Path), help="Network directory.")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _add(netdir: Path, parties: list[tuple[str, str]], csr: bytes | None = None) -> None:
    for name, role in parties:
        netprov.add_party(netdir, name, role, csr=csr)
    rows = []
    for name, role in parties:  # after every add: each kit carries the roster that names the whole batch
        folder, archive = kits.make_kit(netdir, name)
        rows.append((name, role, folder, archive))
    if rows:
        click.echo(table(["party", "role", "kit folder", "kit archive"], rows, max_width=100))
        click.echo("hand each party its kit (it holds the party's secrets): `fedsilo node init --kit KIT` on a node, "
                   "`Experiment(..., network=KIT)` for a researcher")  # fmt: skip


@click.group(invoke_without_command=True)
@NET_DIR
@click.option("--nodes", default="", help="Comma-separated node names.")
@click.option("--researchers", default="", help="Comma-separated researcher names.")
@click.option("--host", default=None, help="Address the network listens on (default 127.0.0.1).")
@click.option("--advertise-host", default=None, help="Address written into kits (default: --host).")
@click.option("--mqtt-port", type=click.IntRange(1, 65535), default=None, help="MQTT port (default 1883).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=None, help="File store port (default 8800).")
@click.option("--broker", type=click.Choice(["embedded", "mosquitto"]), default=None)
@click.option("--tls/--no-tls", default=None, help="TLS on the broker and the file store (default on).")
@click.option("--mutual-tls/--no-mutual-tls", default=None, help="Also require each party's client certificate.")
@click.pass_context
@friendly_errors
def provision(
    ctx: click.Context,
    netdir: Path | None,
    nodes: str,
    researchers: str,
    host: str | None,
    advertise_host: str | None,
    mqtt_port: int | None,
    http_port: int | None,
    broker: str | None,
    tls: bool | None,
    mutual_tls: bool | None,
) -> None:
    """Provision a network: its CA and server certificate, the parties, and a startup kit for each."""
    if ctx.invoked_subcommand is not None:
        return
    if netdir is None:
        raise ConfigError("give the network directory: fedsilo provision --dir NET --nodes a,b --researchers r1")
    cfg = netprov.init_network(netdir, host=host, mqtt_port=mqtt_port, http_port=http_port,
                               broker=broker, tls=tls, mutual_tls=mutual_tls)  # type: ignore[arg-type]  # fmt: skip
    if advertise_host is not None:
        cfg = cfg.model_copy(update={"advertise_host": advertise_host})
        netprov.save_config(netdir, cfg)
        netprov.refresh_credentials(netdir, cfg)
    paths = netprov.network_paths(netdir)
    if cfg.tls:
        pki.ensure_server(paths.pki, [cfg.host, cfg.public_host])
    click.echo(f"network {paths.root}: broker {cfg.public_host}:{cfg.mqtt_port}, file store {cfg.filestore_url}, "
               f"TLS {'on' if cfg.tls else 'off'}{' (mutual)' if cfg.mutual_tls else ''}")  # fmt: skip
    _add(netdir, [(n, "node") for n in _names(nodes)] + [(r, "researcher") for r in _names(researchers)])


@provision.command("add")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--node", "nodes", multiple=True, help="A node to add (repeatable).")
@click.option("--researcher", "researchers", multiple=True, help="A researcher to add (repeatable).")
@friendly_errors
def add(netdir: Path, nodes: tuple[str, ...], researchers: tuple[str, ...]) -> None:
    """Add parties to a provisioned network, each with its kit (a running network accepts them at once)."""
    netprov.load_config(netdir)
    if not nodes and not researchers:
        raise ConfigError("name at least one --node or --researcher")
    _add(netdir, [(n, "node") for n in nodes] + [(r, "researcher") for r in researchers])


@provision.command("kit")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.argument("party")
@friendly_errors
def kit(netdir: Path, party: str) -> None:
    """Write a registered party's kit again (after the network's host or ports changed)."""
    folder, archive = kits.make_kit(netdir, party)
    click.echo(f"kit of '{party}': {folder} and {archive}")


@provision.command("csr")
@click.option("--name", required=True, help="This site's party name, as agreed with the provisioner.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for key and CSR.")
@friendly_errors
def csr(name: str, out: Path) -> None:
    """On the site: make a private key (it stays here) and a signing request to send to the provisioner."""
    if not netprov.NAME_PATTERN.match(name):
        raise ConfigError(f"invalid party name '{name}': use 1-64 letters, digits, '_', '.' or '-'")
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists; a new request would replace the key it was made for")
    key, request = pki.make_csr(name)
    pki.write_private(key_path, key)
    csr_path.write_text(request, encoding="utf-8")
    click.echo(f"key: {key_path} (keep it here, 0600)\nsend to the provisioner: {csr_path}")


@provision.command("sign")
@click.option("--dir", "netdir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--csr", "csr_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--role", type=click.Choice(["node", "researcher"]), required=True)
@click.option("--name", default=None, help="Party name (default: the CSR file's name without .csr).")
@friendly_errors
def sign(netdir: Path, csr_file: Path, role: str, name: str | None) -> None:
    """At the provisioner: register the party of a site's CSR and make its kit (no private key in it)."""
    netprov.load_config(netdir)
    name = name or csr_file.name.removesuffix(".csr")
    _add(netdir, [(name, role)], csr=csr_file.read_bytes())


@provision.command("accept")
@click.option("--kit", "kit_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@friendly_errors
def accept(kit_path: Path, key_file: Path, out: Path) -> None:
    """On the site: the kit the provisioner sent plus the key kept here, as a complete kit folder."""
    folder = kits.accept_kit(kit_path, key_file, out)
    click.echo(f"complete kit: {folder}")
