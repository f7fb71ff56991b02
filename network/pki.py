"""The consortium's certificate authority: X.509 certificates for the network's servers and every party.

`fedsilo network start` and `fedsilo provision` keep the authority in `NETDIR/pki/`:

    NETDIR/pki/ca.crt, ca.key        the consortium CA (key 0600; it never leaves this folder)
    NETDIR/pki/server.crt, .key      the broker's and the file store's certificate (SAN: 127.0.0.1,
                                     localhost, the configured host and advertise_host)
    NETDIR/pki/issued/<party>.crt    every certificate issued to a party (its key is in its kit only)

A party's certificate and key travel in its credentials file (`Credentials.tls`, PEM text), so that a
startup kit is one self-contained file. A site that keeps its own key sends a CSR (`make_csr`) and gets
back a certificate (`sign_csr`), as NVIDIA FLARE 2.8's site-generated keys do.

    ca = CertificateAuthority.ensure(network_paths(netdir).root / "pki", "my consortium")
    key = new_key()
    cert = ca.issue("hospital-a", "node", key.public_key())
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.common.errors import ConfigError

from .credentials import MqttSettings, TlsSettings

CA_DAYS = 3650
"""The consortium CA lives as long as the consortium; rotating it means re-issuing every kit."""
CERT_DAYS = 825
"""Party and server certificates: the longest lifetime TLS clients commonly accept (CA/B forum, 2018)."""
CLOCK_SKEW = dt.timedelta(hours=1)
"""Certificates are valid from an hour back, so a site whose clock runs slow does not refuse a fresh one."""
MAX_CSR_BYTES = 16 << 10


def new_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key: generated in well under a millisecond (RSA-2048 takes ~50 ms, which every
    `add_party` and test network would pay), and understood by Mosquitto, amqtt and uvicorn alike."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_cert(pem: str | bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate ({exc})") from None


def load_key(pem: str | bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the private key is not an elliptic-curve key (make it with `fedsilo provision csr`)")
    return key


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name(attrs)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h and h not in ("0.0.0.0", "::")):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def server_hosts(*hosts: str | None) -> list[str]:
    """The names a server certificate carries: loopback always (local clients, health probes), plus `hosts`."""
    return list(dict.fromkeys(["127.0.0.1", "localhost", *(h for h in hosts if h)]))


@dataclass
class CertificateAuthority:
    """The consortium CA kept in one folder (`NETDIR/pki`); `ensure` makes it on first use."""

    folder: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def pem(self) -> str:
        return cert_pem(self.cert)

    @classmethod
    def exists(cls, folder: Path) -> bool:
        """Whether `folder` holds a CA certificate (its key may be kept elsewhere: `load` needs it)."""
        return (folder / "ca.crt").is_file()

    @classmethod
    def load(cls, folder: Path) -> CertificateAuthority:
        if not cls.exists(folder):
            raise ConfigError(f"{folder}: no consortium CA here (ca.crt and ca.key); run `fedsilo provision` first")
        if not (folder / "ca.key").is_file():
            raise ConfigError(
                f"{folder}/ca.key is not there (kept offline?): put it back to add a party or to re-issue the "
                "servers' certificate; the running network needs only ca.crt and server.crt/server.key"
            )
        return cls(folder, load_cert((folder / "ca.crt").read_bytes()), load_key((folder / "ca.key").read_bytes()))

    @classmethod
    def ensure(cls, folder: Path, consortium: str = "fedsilo consortium") -> CertificateAuthority:
        """Load the CA in `folder`, or create it (self-signed, path length 0: it signs end entities only).
        A CA certificate without its key is never replaced: `load` says to put the key back."""
        if cls.exists(folder) or (folder / "ca.key").exists():
            return cls.load(folder)
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        key = new_key()
        now = dt.datetime.now(dt.UTC)
        name = _name(f"{consortium} CA"[:64])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign only
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(folder / "ca.key", key_pem(key))
        (folder / "ca.crt").write_text(cert_pem(cert), encoding="utf-8")
        return cls(folder, cert, key)

    def issue(
        self,
        common_name: str,
        role: str,
        public_key: ec.EllipticCurvePublicKey,
        hosts: Iterable[str] = (),
    ) -> x509.Certificate:
        """A certificate for `common_name` (a party, or `server` with `hosts` as its SAN).

        Only what the authority decides goes in (name, role as OU, usages): nothing a CSR asked for."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ConfigError("only elliptic-curve keys are signed (make the key with `fedsilo provision csr`)")
        now = dt.datetime.now(dt.UTC)
        server = role == "server"
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, role))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True
            )  # digitalSignature, keyAgreement: what an EC key does in a TLS handshake
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        if not server:
            (self.folder / "issued").mkdir(exist_ok=True)
            (self.folder / "issued" / f"{common_name}.crt").write_text(cert_pem(cert), encoding="utf-8")
        return cert

    def sign_csr(self, csr_pem: bytes, name: str, role: str) -> x509.Certificate:
        """Sign a site's CSR for party `name`: its signature must hold and its common name be `name`."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise ConfigError(f"the CSR is {len(csr_pem)} bytes; a fedsilo CSR is under 1 KiB")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise ConfigError(f"not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise ConfigError("the CSR's signature does not verify: it was not made with the key it carries")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [a.value for a in names] != [name]:
            got = ", ".join(str(a.value) for a in names) or "none"
            raise ConfigError(f"the CSR is for '{got}', not for '{name}'")
        return self.issue(name, role, csr.public_key())  # type: ignore[arg-type]

    def server_certificate(self, hosts: Iterable[str]) -> tuple[Path, Path]:
        """(cert, key) paths of the servers' certificate for `hosts`; re-issued when the hosts changed."""
        cert_path, key_path = self.folder / "server.crt", self.folder / "server.key"
        if _server_current(self.folder, hosts):
            return cert_path, key_path
        key = new_key()
        cert = self.issue("server", "server", key.public_key(), server_hosts(*hosts))
        write_private(key_path, key_pem(key))
        cert_path.write_text(cert_pem(cert), encoding="utf-8")
        return cert_path, key_path

    def party_tls(self, name: str, role: str) -> TlsSettings:
        """A fresh key and certificate for a party, with the CA, as its credentials carry them."""
        key = new_key()
        return TlsSettings(ca=self.pem, cert=cert_pem(self.issue(name, role, key.public_key())), key=key_pem(key))


def _server_current(folder: Path, hosts: Iterable[str]) -> bool:
    """Whether the servers' certificate in `folder` names exactly `hosts` (and loopback), comes from the CA there
    and has more than 30 days left; checked without the CA key."""
    _, cert_path, key_path = server_files(folder)
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    with contextlib.suppress(ConfigError, x509.ExtensionNotFound, InvalidSignature, TypeError, ValueError, OSError):
        cert = load_cert(cert_path.read_bytes())
        ca = load_cert((folder / "ca.crt").read_bytes())
        fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=30)
        same = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == _san(server_hosts(*hosts))
        cert.verify_directly_issued_by(ca)
        return fresh and same
    return False


def make_csr(name: str) -> tuple[str, str]:
    """(key PEM, CSR PEM) for party `name`: made on the site, whose key never leaves it."""
    key = new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode()


def check_pair(cert: str, key: str) -> None:
    """Raise unless `key` is the private key of `cert`."""
    public = load_cert(cert).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = load_key(key).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != mine:
        raise ConfigError("the private key does not belong to the certificate")


# ---------------------------------------------------------------------------------------- clients
@contextlib.contextmanager
def _pem_files(*pems: str) -> Iterator[list[str]]:
    """Paths holding `pems`, for `load_cert_chain`, which reads files only. Linux: memfd files, so a key
    never touches a disk; elsewhere a private temporary folder, removed on exit."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("fedsilo-tls") for _ in pems]
        try:
            for fd, pem in zip(fds, pems, strict=True):
                os.write(fd, pem.encode())
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="fedsilo-tls-") as tmp:
        paths = []
        for i, pem in enumerate(pems):
            write_private(Path(tmp) / str(i), pem)
            paths.append(str(Path(tmp) / str(i)))
        yield paths


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client's TLS context: trusts the consortium CA only (not the system's), checks the server's name,
    TLS 1.2 or later, and presents the party's certificate when it has one (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=tls.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"the credentials' CA certificate does not load ({exc})") from None
    if tls.cert and tls.key:
        with _pem_files(tls.cert, tls.key) as (cert_file, key_file):
            try:
                ctx.load_cert_chain(cert_file, key_file)
            except ssl.SSLError as exc:
                raise ConfigError(f"the credentials' certificate and key do not load ({exc})") from None
    return ctx


def party_tls(folder: Path, name: str, role: str, csr: bytes | None = None) -> TlsSettings:
    """The TLS settings a new party's credentials carry: a fresh key and certificate, or with `csr` a
    certificate for the site's own key (then no key: it stays on the site)."""
    ca = CertificateAuthority.ensure(folder)
    if csr is None:
        return ca.party_tls(name, role)
    return TlsSettings(ca=ca.pem, cert=cert_pem(ca.sign_csr(csr, name, role)))


def ensure_ca(folder: Path) -> None:
    """Make the consortium CA in `folder` unless its certificate is there (the key may be kept offline)."""
    if not CertificateAuthority.exists(folder):
        CertificateAuthority.ensure(folder)


def server_files(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) in a network's `pki` folder (`ensure_server` makes them)."""
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


def ensure_server(folder: Path, hosts: Iterable[str]) -> tuple[Path, Path, Path]:
    """Make sure the servers' certificate in `folder` covers `hosts` (re-issued when not: that needs the CA key);
    its paths."""
    if not _server_current(folder, hosts):
        CertificateAuthority.ensure(folder).server_certificate(hosts)
    return server_files(folder)


def paho_tls(client: Any, settings: MqttSettings) -> None:
    """Make a paho client speak TLS as `settings` say (nothing when they carry no TLS): the CA, the
    server's name checked, the party's certificate for mutual TLS. Used by every MQTT client of fedsilo."""
    if settings.tls is not None:
        client.tls_set_context(client_context(settings.tls))
    elif settings.tls_ca:  # a CA file path (credentials written before kits carried the PEM)
        client.tls_set(ca_certs=settings.tls_ca, cert_reqs=ssl.CERT_REQUIRED)
