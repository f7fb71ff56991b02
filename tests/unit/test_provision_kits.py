"""`fedsilo provision`: the consortium CA, a startup kit per party that `node init --kit` and `Experiment`
take as is, and site-generated keys signed centrally (the key never leaves the site). Hostile inputs:
CSRs for another name, forged or greedy CSRs, wrong keys, crafted kit archives. Real files, no network."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.common.errors import ConfigError
from fedsilo.network import kits, pki, provision
from fedsilo.network.cli_provision import provision as provision_cli
from fedsilo.network.credentials import Credentials
from fedsilo.node.cli import node as node_cli
from fedsilo.researcher.settings import resolve_credentials

RUN = CliRunner()


def invoke(group: click.Group, *args: object, ok: bool = True) -> Result:
    result = RUN.invoke(group, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    netdir = tmp_path_factory.mktemp("prov") / "net"
    invoke(provision_cli, "--dir", netdir, "--nodes", "a,b", "--researchers", "r1", "--mqtt-port", "18830",
           "--http-port", "18800", "--advertise-host", "fl.example.org")  # fmt: skip
    yield netdir


def _cert(pem: str) -> x509.Certificate:
    return pki.load_cert(pem)


def _files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ kits
def test_provision_makes_a_kit_per_party(net: Path) -> None:
    ca = pki.CertificateAuthority.load(net / "pki")
    for party, role in (("a", "node"), ("b", "node"), ("r1", "researcher")):
        folder, archive = net / "kits" / party, net / "kits" / f"{party}.tar.gz"
        assert folder.stat().st_mode & 0o777 == 0o700 and archive.stat().st_mode & 0o777 == 0o600
        assert (folder / "credentials.json").stat().st_mode & 0o777 == 0o600
        assert (folder / f"{party}.key").stat().st_mode & 0o777 == 0o600
        creds = kits.load_kit(archive)
        assert creds == Credentials.load(net / "credentials" / f"{party}.json") == kits.load_kit(folder)
        assert creds.role == role and creds.mqtt.host == "fl.example.org" and creds.mqtt.port == 18830
        assert creds.filestore.url == "https://fl.example.org:18800"
        assert creds.tls is not None and creds.tls.ca == ca.pem and creds.tls.cert and creds.tls.key
        cert = _cert(creds.tls.cert)
        cert.verify_directly_issued_by(ca.cert)  # signed by the consortium CA
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == party
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        pki.check_pair(creds.tls.cert, creds.tls.key)
        with tarfile.open(archive) as tar:
            assert all(m.name == party or m.name.startswith(f"{party}/") for m in tar.getmembers())
        # the message-signing identity travels in the kit too, with the roster that names the whole batch
        assert creds.signing_key and creds.authority_key
        assert (folder / "roster.signed").read_bytes() == (net / "roster.signed").read_bytes()
    server = x509.load_pem_x509_certificate((net / "pki" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert (net / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert not any("PRIVATE KEY" in p.read_text(errors="ignore") for p in (net / "pki" / "issued").iterdir())


def test_provision_add_later_and_refuse_a_taken_name(net: Path) -> None:
    invoke(provision_cli, "add", "--dir", net, "--node", "d", "--researcher", "r2")
    assert kits.load_kit(net / "kits" / "d.tar.gz").role == "node"
    assert kits.load_kit(net / "kits" / "r2").role == "researcher"
    before = (net / "kits" / "a" / "credentials.json").read_bytes()
    result = invoke(provision_cli, "add", "--dir", net, "--node", "a", ok=False)
    assert result.exit_code == 1 and "already exists" in result.output
    assert (net / "kits" / "a" / "credentials.json").read_bytes() == before  # a's kit is untouched


def test_node_init_takes_a_kit_as_is(net: Path, tmp_path: Path) -> None:
    for form in ("a.tar.gz", "a"):
        nodedir = tmp_path / f"node-{form}"
        invoke(node_cli, "init", "--dir", nodedir, "--kit", net / "kits" / form)
        assert Credentials.load(nodedir / "network.json") == kits.load_kit(net / "kits" / "a.tar.gz")
        assert 'name = "a"' in (nodedir / "config.toml").read_text()
    refused = invoke(node_cli, "init", "--dir", tmp_path / "n-r1", "--kit", net / "kits" / "r1.tar.gz", ok=False)
    assert refused.exit_code == 1 and "not a node" in refused.output


def test_experiment_credentials_take_a_kit(net: Path) -> None:
    assert resolve_credentials(net / "kits" / "r1.tar.gz") == kits.load_kit(net / "kits" / "r1")
    assert resolve_credentials(str(net / "kits" / "r1")).party == "r1"
    with pytest.raises(ConfigError, match="not of a researcher"):
        resolve_credentials(net / "kits" / "b.tar.gz")


def test_provision_without_tls(tmp_path: Path) -> None:
    invoke(provision_cli, "--dir", tmp_path / "plain", "--nodes", "a", "--no-tls")
    creds = kits.load_kit(tmp_path / "plain" / "kits" / "a.tar.gz")
    assert creds.tls is None and creds.filestore.url.startswith("http://")
    assert not (tmp_path / "plain" / "pki").exists()


# ------------------------------------------------------------------------------------ site keys
def test_a_site_csr_signed_centrally_keeps_the_key_on_the_site(net: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    invoke(provision_cli, "csr", "--name", "site-e", "--out", site)
    key = (site / "site-e.key").read_text()
    assert (site / "site-e.key").stat().st_mode & 0o777 == 0o600
    invoke(provision_cli, "sign", "--dir", net, "--csr", site / "site-e.csr", "--role", "node")
    unsigned = net / "kits" / "site-e.tar.gz"
    with pytest.raises(ConfigError, match="no TLS private key"):
        kits.load_kit(unsigned)
    body = "".join(key.strip().splitlines()[1:-1])  # the key's base64, however a file might wrap it
    for path in _files(net):  # nothing the provisioner holds contains the site's key
        assert body not in "".join(path.read_text(errors="ignore").split()), path
    assert not (net / "kits" / "site-e" / "site-e.key").exists()

    invoke(provision_cli, "accept", "--kit", unsigned, "--key", site / "site-e.key", "--out", site / "kit")
    nodedir = tmp_path / "node-e"
    invoke(node_cli, "init", "--dir", nodedir, "--kit", site / "kit")
    creds = Credentials.load(nodedir / "network.json")
    assert creds.tls is not None and creds.tls.key == key
    pki.check_pair(creds.tls.cert or "", key)
    assert "site-e" in provision.load_parties(net)


def test_a_csr_for_another_name_or_forged_is_refused_and_nothing_registered(net: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    invoke(provision_cli, "csr", "--name", "site-f", "--out", site)
    other = invoke(provision_cli, "sign", "--dir", net, "--csr", site / "site-f.csr", "--role", "node",
                   "--name", "hospital-z", ok=False)  # fmt: skip
    assert other.exit_code == 1 and "for 'site-f', not for 'hospital-z'" in other.output

    pem = (site / "site-f.csr").read_text()
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(Encoding.DER))
    der[-5] ^= 0x01  # a bit of the signature
    forged = site / "site-f-forged.csr"
    forged.write_text(_pem_csr(bytes(der)))
    bad = invoke(provision_cli, "sign", "--dir", net, "--csr", forged, "--role", "node", "--name", "site-f", ok=False)
    assert bad.exit_code == 1 and ("does not verify" in bad.output or "not a PEM" in bad.output)

    taken = invoke(provision_cli, "sign", "--dir", net, "--csr", site / "site-f.csr", "--role", "node",
                   "--name", "a", ok=False)  # fmt: skip
    assert taken.exit_code == 1
    parties = provision.load_parties(net)
    assert "hospital-z" not in parties and "site-f" not in parties
    assert not (net / "kits" / "hospital-z").exists() and not (net / "kits" / "site-f").exists()


def test_a_greedy_csr_gets_an_ordinary_certificate(net: Path) -> None:
    """A CSR that asks to be a CA (and to serve the network's host) gets a party's certificate only."""
    key = pki.new_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "greedy")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fl.example.org")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca = pki.CertificateAuthority.load(net / "pki")
    cert = ca.sign_csr(greedy.public_bytes(Encoding.PEM), "greedy", "node")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_accept_refuses_a_key_that_is_not_the_kits(net: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    invoke(provision_cli, "csr", "--name", "site-g", "--out", site)
    invoke(provision_cli, "sign", "--dir", net, "--csr", site / "site-g.csr", "--role", "node")
    stranger, _ = pki.make_csr("site-g")
    (tmp_path / "other.key").write_text(stranger)
    result = invoke(provision_cli, "accept", "--kit", net / "kits" / "site-g.tar.gz", "--key", tmp_path / "other.key",
                    "--out", tmp_path / "kit", ok=False)  # fmt: skip
    assert result.exit_code == 1 and "does not belong" in result.output
    assert not (tmp_path / "kit").exists()


# ------------------------------------------------------------------------------------ crafted archives
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_a_crafted_kit_archive_is_read_not_unpacked(net: Path, tmp_path: Path) -> None:
    creds = (net / "kits" / "b" / "credentials.json").read_bytes()
    evil = tmp_path / "work"
    evil.mkdir()
    traversal = _tar(tmp_path / "traversal.tar.gz", [
        (tarfile.TarInfo("../../escaped.txt"), b"outside"),
        (tarfile.TarInfo("/tmp/absolute-escape.txt"), b"outside"),
        (tarfile.TarInfo("b/credentials.json"), creds),
    ])  # fmt: skip
    assert kits.load_kit(traversal).party == "b"  # only credentials.json is read
    assert not (tmp_path.parent / "escaped.txt").exists() and not Path("/tmp/absolute-escape.txt").exists()

    link = tarfile.TarInfo("b/credentials.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ConfigError, match="not a regular file"):
        kits.load_kit(_tar(tmp_path / "link.tar.gz", [(link, None)]))
    two = [(tarfile.TarInfo("b/credentials.json"), creds), (tarfile.TarInfo("credentials.json"), creds)]
    with pytest.raises(ConfigError, match="exactly one"):
        kits.load_kit(_tar(tmp_path / "two.tar.gz", two))
    huge = [(tarfile.TarInfo("b/credentials.json"), b" " * (2 << 20))]
    with pytest.raises(ConfigError, match="at most 1 MiB"):
        kits.load_kit(_tar(tmp_path / "huge.tar.gz", huge))
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="not a readable"):
        kits.load_kit(tmp_path / "junk.tar.gz")
    wrong = json.loads(creds)
    wrong["role"] = "superuser"
    superuser = [(tarfile.TarInfo("credentials.json"), json.dumps(wrong).encode())]
    with pytest.raises(ConfigError, match="role"):
        kits.load_kit(_tar(tmp_path / "role.tar.gz", superuser))


def _pem_csr(der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def test_the_ca_key_can_be_kept_offline(tmp_path: Path) -> None:
    """The running network needs the CA certificate and the servers' certificate only: with ca.key moved away,
    `network init` and the servers' certificate still work, and adding a party says to put the key back,
    instead of a new CA silently replacing the one every kit trusts."""
    netdir = tmp_path / "net"
    invoke(provision_cli, "--dir", netdir, "--nodes", "a", "--http-port", "18801", "--mqtt-port", "18831")
    ca_crt, server_crt = (netdir / "pki" / "ca.crt").read_bytes(), (netdir / "pki" / "server.crt").read_bytes()
    (netdir / "pki" / "ca.key").rename(tmp_path / "ca.key")
    cfg = provision.init_network(netdir)
    pki.ensure_server(netdir / "pki", [cfg.host, cfg.public_host])
    assert (netdir / "pki" / "ca.crt").read_bytes() == ca_crt
    assert (netdir / "pki" / "server.crt").read_bytes() == server_crt
    refused = invoke(provision_cli, "add", "--dir", netdir, "--node", "b", ok=False)
    assert refused.exit_code == 1 and "ca.key is not there" in refused.output
    assert "b" not in provision.load_parties(netdir) and not (netdir / "credentials" / "b.json").exists()
    with pytest.raises(ConfigError, match="put it back"):
        pki.ensure_server(netdir / "pki", ["fl.example.org"])  # a new host needs the key
    (tmp_path / "ca.key").rename(netdir / "pki" / "ca.key")
    invoke(provision_cli, "add", "--dir", netdir, "--node", "b")
    assert (netdir / "pki" / "ca.crt").read_bytes() == ca_crt
