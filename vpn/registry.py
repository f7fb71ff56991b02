"""The consortium's WireGuard registry (`VPNDIR/vpn.json`) and the configuration files made from it.

Layout of VPNDIR (every file 0600: the hub config and vpn.json hold preshared keys):

    vpn.json           hub endpoint, subnet, the hub's public key, one entry per peer
    hub.key            the hub's private key
    hub/wg-fedsilo.conf  the hub's configuration (install on the network host)
    peers/NAME.conf    one configuration per party (hand it over with the party's startup kit)

Parties reach the hub only (`AllowedIPs` = the hub's /32): a hospital's node cannot talk to another
hospital through the tunnel, only to the broker and the file store on the network host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from fedsilo.common.errors import FedsiloError

from .keys import KeyPair, check_key, generate_keypair, generate_preshared_key, public_key_of

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
INTERFACE = "wg-fedsilo"
KEEPALIVE_S = 25  # hospital NATs drop idle UDP mappings after 30-120 s; WireGuard's recommended value


class VpnError(FedsiloError):
    """The VPN registry cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class Peer:
    name: str
    address: str
    public_key: str
    preshared_key: str
    site_key: bool  # the party generated its key itself; its config references the key file instead


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class VpnRegistry:
    """Hub and peers of one consortium's WireGuard network.

        reg = VpnRegistry.init("vpn", endpoint="fl.example.org:51820", subnet="10.77.0.0/24")
        reg.add("hospital-a")                  # writes peers/hospital-a.conf with a fresh key
        reg.add("hospital-b", public_key=KEY)  # the site keeps its private key
        print(reg.peer_config("hospital-a"))
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.state_file.is_file():
            raise VpnError(f"{self.root}: no VPN here (run `fedsilo vpn init --dir {self.root}` first)")

    @property
    def state_file(self) -> Path:
        return self.root / "vpn.json"

    @property
    def hub_config_file(self) -> Path:
        return self.root / "hub" / f"{INTERFACE}.conf"

    def peer_config_file(self, name: str) -> Path:
        return self.root / "peers" / f"{name}.conf"

    @classmethod
    def init(cls, root: str | Path, endpoint: str, subnet: str = "10.77.0.0/24", port: int = 51820) -> VpnRegistry:
        root = Path(root).expanduser().resolve()
        if (root / "vpn.json").exists():
            raise VpnError(f"{root}: a VPN already exists here")
        net = _subnet(subnet)
        if not re.match(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", endpoint):
            raise VpnError(f"endpoint '{endpoint}' must be HOST:PORT, the hub's public address")
        hub = generate_keypair()
        _write_private(root / "hub.key", hub.private + "\n")
        state = {"format_version": 1, "endpoint": endpoint, "subnet": str(net), "port": port,
                 "hub": {"address": str(next(net.hosts())), "public_key": hub.public}, "peers": {}}  # fmt: skip
        _write_private(root / "vpn.json", json.dumps(state, indent=2))
        reg = cls(root)
        reg._write_hub()
        return reg

    # ------------------------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text(encoding="utf-8"))

    def _save(self, state: dict[str, Any]) -> None:
        _write_private(self.state_file, json.dumps(state, indent=2))

    def _lock(self) -> FileLock:
        return FileLock(str(self.root / ".vpn.lock"), timeout=30)

    def peers(self) -> list[Peer]:
        return [Peer(name=n, **p) for n, p in sorted(self._state()["peers"].items()) if "address" in p]

    def hub_keypair(self) -> KeyPair:
        private = (self.root / "hub.key").read_text(encoding="utf-8").strip()
        return KeyPair(private=private, public=public_key_of(private))

    # ------------------------------------------------------------------------------- changes
    def add(self, name: str, public_key: str | None = None) -> Peer:
        """Give `name` the next free address; with `public_key` the party keeps its private key on site."""
        if not NAME.match(name):
            raise VpnError(f"invalid peer name '{name}': use 1-64 letters, digits, '_', '.' or '-'")
        if public_key is not None:
            try:
                check_key(public_key)
            except ValueError as exc:
                raise VpnError(f"public key of '{name}': {exc}") from None
        with self._lock():
            state = self._state()
            if name in state["peers"]:
                raise VpnError(f"a peer named '{name}' already exists ({state['peers'][name]['address']})")
            address = self._free_address(state)
            pair = generate_keypair() if public_key is None else None
            peer = Peer(name=name, address=address, public_key=public_key or pair.public,  # type: ignore[union-attr]
                        preshared_key=generate_preshared_key(), site_key=public_key is not None)  # fmt: skip
            state["peers"][name] = {"address": peer.address, "public_key": peer.public_key,
                                    "preshared_key": peer.preshared_key, "site_key": peer.site_key}  # fmt: skip
            self._save(state)
            _write_private(self.peer_config_file(name), self._render_peer(state, peer, pair))
            self._write_hub(state)
        return peer

    def remove(self, name: str) -> None:
        with self._lock():
            state = self._state()
            if name not in state["peers"]:
                raise VpnError(f"no peer named '{name}'")
            del state["peers"][name]
            self._save(state)
            self.peer_config_file(name).unlink(missing_ok=True)
            self._write_hub(state)

    def _free_address(self, state: dict[str, Any]) -> str:
        used = {state["hub"]["address"]} | {p["address"] for p in state["peers"].values()}
        for host in _subnet(state["subnet"]).hosts():
            if str(host) not in used:
                return str(host)
        raise VpnError(f"subnet {state['subnet']} is full ({len(used)} addresses in use)")

    # ------------------------------------------------------------------------------- rendering
    def _write_hub(self, state: dict[str, Any] | None = None) -> None:
        state = state or self._state()
        prefix = _subnet(state["subnet"]).prefixlen
        lines = ["# fedsilo VPN hub: install as /etc/wireguard/wg-fedsilo.conf, then `wg-quick up wg-fedsilo`",
                 "[Interface]", f"Address = {state['hub']['address']}/{prefix}",
                 f"ListenPort = {state['port']}", f"PrivateKey = {self.hub_keypair().private}"]  # fmt: skip
        for name, p in sorted(state["peers"].items()):
            lines += ["", f"# {name}", "[Peer]", f"PublicKey = {p['public_key']}",
                      f"PresharedKey = {p['preshared_key']}", f"AllowedIPs = {p['address']}/32"]  # fmt: skip
        _write_private(self.hub_config_file, "\n".join(lines) + "\n")

    def _render_peer(self, state: dict[str, Any], peer: Peer, pair: KeyPair | None) -> str:
        lines = [f"# fedsilo VPN peer '{peer.name}': install as /etc/wireguard/{INTERFACE}.conf, then "
                 f"`wg-quick up {INTERFACE}`", "[Interface]", f"Address = {peer.address}/32"]  # fmt: skip
        if pair is not None:
            lines.append(f"PrivateKey = {pair.private}")
        else:  # the site's key never left the site: wg-quick loads it from the file it was generated into
            lines.append(f"PostUp = wg set %i private-key /etc/wireguard/{peer.name}.key")
        lines += ["", "# the network host (broker and file store)", "[Peer]",
                  f"PublicKey = {state['hub']['public_key']}", f"PresharedKey = {peer.preshared_key}",
                  f"Endpoint = {state['endpoint']}", f"AllowedIPs = {state['hub']['address']}/32",
                  f"PersistentKeepalive = {KEEPALIVE_S}"]  # fmt: skip
        return "\n".join(lines) + "\n"

    def peer_config(self, name: str) -> str:
        path = self.peer_config_file(name)
        if not path.is_file():
            raise VpnError(f"no configuration for peer '{name}' in {path.parent}")
        return path.read_text(encoding="utf-8")

    def hub_config(self) -> str:
        return self.hub_config_file.read_text(encoding="utf-8")

    def hub_address(self) -> str:
        return self._state()["hub"]["address"]


def _subnet(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise VpnError(f"subnet '{text}': {exc}") from None
    if not net.is_private:
        raise VpnError(f"subnet {net} is not a private range (use e.g. 10.77.0.0/24)")
    if net.num_addresses < 4:
        raise VpnError(f"subnet {net} is too small for a hub and one peer")
    return net
