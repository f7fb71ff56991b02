"""The network directory's authority and roster (`network/roster.py`), without a running network."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedsilo.common.signing import Roster, private_from_b64, public_b64, public_from_b64
from fedsilo.network import provision, roster, topics
from fedsilo.network.credentials import Credentials


@pytest.fixture
def netdir(tmp_path: Path) -> Path:
    provision.init_network(tmp_path / "net", mqtt_port=1, http_port=2, broker="embedded", tls=False)
    return tmp_path / "net"


def test_a_new_party_gets_a_key_the_authority_vouches_for(netdir: Path) -> None:
    r1 = provision.add_party(netdir, "r1", "researcher")
    n1 = provision.add_party(netdir, "n1", "node")
    key_file = netdir / "authority.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    authority = public_from_b64(n1.authority_key or "")
    seen_by_n1 = Roster.verify(n1.roster or "", authority)
    assert seen_by_n1.parties["n1"].role == "node" and seen_by_n1.parties["n1"].key == public_b64(
        private_from_b64(n1.signing_key or ""))  # fmt: skip
    assert seen_by_n1.parties["r1"].role == "researcher"
    assert "n1" not in Roster.verify(r1.roster or "", authority).parties, "r1's roster is as of its creation"
    assert roster.current(netdir).version == seen_by_n1.version == 2
    assert Credentials.load(netdir / "credentials" / "n1.json").signing_key == n1.signing_key


def test_credentials_made_before_signatures_get_keys_at_the_next_start(netdir: Path) -> None:
    provision.add_party(netdir, "n1", "node")
    path = netdir / "credentials" / "n1.json"
    old = Credentials.load(path)
    old.model_copy(update={"signing_key": None, "authority_key": None, "roster": None}).save(path)
    assert roster.ensure_keys(netdir, netdir / "credentials") == ["n1"]
    new = Credentials.load(path)
    assert new.signing_key and new.signing_key != old.signing_key
    assert roster.current(netdir).parties["n1"].key == public_b64(private_from_b64(new.signing_key))
    assert roster.ensure_keys(netdir, netdir / "credentials") == []


def test_only_the_networks_monitor_writes_the_roster_and_parties_read_it() -> None:
    assert provision.acl_allows(provision.MONITOR, "admin", topics.ROSTER, "write")
    for role in ("node", "researcher"):
        assert provision.acl_allows("x", role, topics.ROSTER, "read")
        assert not provision.acl_allows("x", role, topics.ROSTER, "write")
    assert not provision.acl_allows(provision.MONITOR, "admin", topics.presence("n1"), "write")
