"""`fedsilo vpn`: make and keep the consortium's WireGuard configurations."""

from __future__ import annotations

from pathlib import Path

import click

from fedsilo.common.clitools import friendly_errors, table

from .registry import VpnRegistry

_dir = click.option("--dir", "vpndir", type=click.Path(file_okay=False, path_type=Path), default="vpn",
                    show_default=True, help="The VPN folder (keys and configurations).")  # fmt: skip


@click.group()
def vpn() -> None:
    """WireGuard tunnel between the network host (hub) and every party."""


@vpn.command("init")
@_dir
@click.option("--endpoint", required=True, help="HOST:PORT where parties reach the hub (the network host).")
@click.option("--subnet", default="10.77.0.0/24", show_default=True, help="Private tunnel range.")
@click.option("--port", default=51820, show_default=True, type=click.IntRange(1, 65535), help="Hub UDP port.")
@friendly_errors
def init(vpndir: Path, endpoint: str, subnet: str, port: int) -> None:
    """Create the hub's keys and configuration."""
    reg = VpnRegistry.init(vpndir, endpoint=endpoint, subnet=subnet, port=port)
    click.echo(f"hub {reg.hub_address()} on {endpoint}: {reg.hub_config_file}")
    click.echo(f"run the network on the tunnel: fedsilo network init --host {reg.hub_address()}")


@vpn.command("add")
@_dir
@click.argument("name")
@click.option("--public-key", default=None, help="The party's own key (from `wg genkey | wg pubkey` on site).")
@friendly_errors
def add(vpndir: Path, name: str, public_key: str | None) -> None:
    """Add a party (node or researcher) and write its configuration."""
    reg = VpnRegistry(vpndir)
    peer = reg.add(name, public_key=public_key)
    click.echo(f"{name}: {peer.address}, config {reg.peer_config_file(name)} (hub config updated: reload the hub "
               f"with `wg syncconf wg-fedsilo <(wg-quick strip wg-fedsilo)`)")


@vpn.command("remove")
@_dir
@click.argument("name")
@friendly_errors
def remove(vpndir: Path, name: str) -> None:
    """Remove a party; its key stops working once the hub reloads its configuration."""
    VpnRegistry(vpndir).remove(name)
    click.echo(f"{name} removed")


@vpn.command("list")
@_dir
@friendly_errors
def list_peers(vpndir: Path) -> None:
    """The hub and every peer with its tunnel address."""
    reg = VpnRegistry(vpndir)
    rows = [("hub", reg.hub_address(), reg.hub_keypair().public, "network host")]
    rows += [(p.name, p.address, p.public_key, "site" if p.site_key else "provisioned") for p in reg.peers()]
    click.echo(table(["NAME", "ADDRESS", "PUBLIC KEY", "KEY"], rows))


@vpn.command("show")
@_dir
@click.argument("name")
@friendly_errors
def show(vpndir: Path, name: str) -> None:
    """Print a party's configuration (`hub` for the hub's)."""
    reg = VpnRegistry(vpndir)
    click.echo(reg.hub_config() if name == "hub" else reg.peer_config(name), nl=False)
