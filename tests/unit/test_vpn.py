"""`fedsilo vpn`: the generated WireGuard files parse with Debian's wireguard-tools and the keys pair up."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.vpn import VpnError, VpnRegistry, generate_keypair, public_key_of
from fedsilo.vpn.cli import vpn


def _wg(*args: str, stdin: str = "") -> str:
    return subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=True).stdout.strip()


def _sections(text: str) -> list[dict[str, str]]:
    """wg-quick strip's output (what `wg setconf` accepts) as a list of {key: value} per section."""
    out: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line in ("[Interface]", "[Peer]"):
            out.append({"": line})
        elif "=" in line:
            key, _, value = line.partition("=")
            out[-1][key.strip()] = value.strip()
    return out


def _strip(path: Path) -> list[dict[str, str]]:
    done = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return _sections(done.stdout)


@pytest.fixture
def reg(tmp_path: Path) -> VpnRegistry:
    return VpnRegistry.init(tmp_path / "vpn", endpoint="fl.example.org:51820", subnet="10.77.0.0/29")


@pytest.mark.wireguard
def test_our_keys_are_what_wg_derives() -> None:
    for _ in range(5):
        pair = generate_keypair()
        assert _wg("pubkey", stdin=pair.private) == pair.public
    private = _wg("genkey")
    assert public_key_of(private) == _wg("pubkey", stdin=private)


@pytest.mark.wireguard
def test_hub_and_peer_configs_parse_and_pair_up(reg: VpnRegistry) -> None:
    site = generate_keypair()
    reg.add("hospital-a")
    reg.add("researcher-1", public_key=site.public)
    hub_iface, *hub_peers = _strip(reg.hub_config_file)
    assert _wg("pubkey", stdin=hub_iface["PrivateKey"]) == reg.hub_keypair().public
    assert hub_iface["ListenPort"] == "51820"
    by_key = {p["PublicKey"]: p for p in hub_peers}
    assert len(by_key) == 2

    iface, hub = _strip(reg.peer_config_file("hospital-a"))
    own_public = _wg("pubkey", stdin=iface["PrivateKey"])
    assert own_public in by_key and by_key[own_public]["AllowedIPs"] == "10.77.0.2/32"
    assert hub["PublicKey"] == reg.hub_keypair().public and hub["Endpoint"] == "fl.example.org:51820"
    assert hub["PresharedKey"] == by_key[own_public]["PresharedKey"]
    assert hub["AllowedIPs"] == "10.77.0.1/32"  # a party reaches the network host, not the other hospitals

    # the site-keyed peer: no private key anywhere in the registry, the hub knows its public key
    iface, hub = _strip(reg.peer_config_file("researcher-1"))
    assert "PrivateKey" not in iface
    assert site.private not in "".join(p.read_text() for p in reg.root.rglob("*") if p.is_file())
    assert by_key[site.public]["AllowedIPs"] == "10.77.0.3/32"


def test_files_are_private_and_addresses_unique(reg: VpnRegistry) -> None:
    for name in ("a", "b", "c", "d", "e"):
        reg.add(name)
    with pytest.raises(VpnError, match="full"):
        reg.add("f")  # a /29 has 6 hosts: the hub and five peers
    assert len({p.address for p in reg.peers()}) == 5
    for path in [reg.state_file, reg.hub_config_file, reg.root / "hub.key", reg.peer_config_file("a")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    reg.remove("c")
    assert "10.77.0.4" not in reg.hub_config() and not reg.peer_config_file("c").exists()
    assert reg.add("g").address == "10.77.0.4"  # a removed party's address is reused, its key is not


@pytest.mark.parametrize("name", ["../escape", "a b", "", "x" * 65, "a\nPostUp = rm -rf /"])
def test_hostile_names_are_refused(reg: VpnRegistry, name: str) -> None:
    with pytest.raises(VpnError, match="invalid peer name"):
        reg.add(name)


@pytest.mark.parametrize("key", ["not-base64!", "QUFB", "A" * 43 + "=\nPostUp = id"])
def test_bad_site_keys_are_refused(reg: VpnRegistry, key: str) -> None:
    with pytest.raises(VpnError, match="public key"):
        reg.add("site", public_key=key)
    assert "site" not in reg.hub_config()


def test_bad_subnets_and_endpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VpnError, match="private"):
        VpnRegistry.init(tmp_path / "a", endpoint="h:1", subnet="8.8.8.0/24")
    with pytest.raises(VpnError, match="HOST:PORT"):
        VpnRegistry.init(tmp_path / "b", endpoint="h\nPostUp = id")
    VpnRegistry.init(tmp_path / "c", endpoint="h:1")
    with pytest.raises(VpnError, match="already exists"):
        VpnRegistry.init(tmp_path / "c", endpoint="h:1")


def test_cli_table_and_show(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "v")
    assert runner.invoke(vpn, ["init", "--dir", d, "--endpoint", "fl:51820"]).exit_code == 0
    assert runner.invoke(vpn, ["add", "--dir", d, "node-a"]).exit_code == 0
    listed = runner.invoke(vpn, ["list", "--dir", d]).output
    assert re.search(r"^node-a\s+10\.77\.0\.2\s+\S{44}\s+provisioned$", listed, re.M), listed
    assert "Endpoint = fl:51820" in runner.invoke(vpn, ["show", "--dir", d, "node-a"]).output
    missing = runner.invoke(vpn, ["show", "--dir", d, "nobody"])
    assert missing.exit_code != 0 and "no configuration" in missing.output


@pytest.mark.wireguard
def test_configs_load_into_a_real_interface_where_the_kernel_has_wireguard(reg: VpnRegistry, tmp_path: Path) -> None:
    """`wg setconf` is the real parser; it needs a WireGuard interface, which containers often lack."""
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "add", "wgt", "type", "wireguard"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no WireGuard interfaces in this kernel: {probe.stderr.decode().strip()}")
    reg.add("hospital-a")
    for conf in (reg.hub_config_file, reg.peer_config_file("hospital-a")):
        stripped = tmp_path / "stripped.conf"
        stripped.write_text(subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True,
                                           check=True).stdout)  # fmt: skip
        script = f"ip link add wgt type wireguard && wg setconf wgt {stripped} && wg showconf wgt"
        shown = subprocess.run(["unshare", "-rn", "sh", "-c", script], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        assert _sections(shown.stdout)[1:] == _sections(stripped.read_text())[1:]
