"""TLS on both brokers and the file store, against parties that hold valid credentials but break the rules
(issue 10): plain connections, clients that trust another CA, wrong passwords, and under mutual TLS
clients without a certificate or with one from another CA. No mocks: networks run under
`fedsilo network start`, a node daemon starts from its startup kit."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from fedsilo.common.processes import FEDSILO, free_port
from fedsilo.network import kits, pki, provision
from fedsilo.network.broker import broker_accepts
from fedsilo.network.credentials import Credentials, TlsSettings
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.messaging import BrokerUnavailable, Messaging
from tests.support.brokers import BOTH
from tests.support.procs import NetworkHandle, start_node, start_process

BROKERS = BOTH


def _network(base: Path, broker: str, mutual: bool) -> NetworkHandle:
    """A provisioned network (node `a`, researcher `r1`, their kits) started on free ports."""
    netdir = base / "network"
    provision.init_network(netdir, mqtt_port=free_port(), http_port=free_port(), broker=broker,  # type: ignore[arg-type]
                           mutual_tls=mutual)  # fmt: skip
    for name, role in (("a", "node"), ("r1", "researcher")):
        provision.add_party(netdir, name, role)
        kits.make_kit(netdir, name)
    handle = NetworkHandle(netdir=netdir, broker=broker, log_path=base / "network.log")
    handle.start()
    return handle


@pytest.fixture(scope="module", params=BROKERS)
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = _network(tmp_path_factory.mktemp(f"tls-{request.param}"), request.param, mutual=False)
    yield handle
    handle.stop()


@pytest.fixture(scope="module", params=BROKERS)
def mutual(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = _network(tmp_path_factory.mktemp(f"mtls-{request.param}"), request.param, mutual=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> pki.CertificateAuthority:
    """Another consortium's CA: its certificates look right and prove nothing here."""
    return pki.CertificateAuthority.ensure(tmp_path_factory.mktemp("rogue") / "pki", "rogue")


def _with_tls(creds: Credentials, tls: TlsSettings | None) -> Credentials:
    data = creds.model_dump()
    data["tls"] = None if tls is None else tls.model_dump()
    return Credentials.model_validate(data)


def _plain_http(creds: Credentials) -> str:
    return creds.filestore.url.replace("https://", "http://")


# ------------------------------------------------------------------------------------ TLS only
def test_the_network_speaks_tls_only(net: NetworkHandle) -> None:
    creds = net.credentials("r1")
    assert creds.filestore.url.startswith("https://") and creds.tls is not None and creds.tls.key
    assert broker_accepts(creds.mqtt)
    with FileStoreClient(creds.filestore) as client:
        ref = client.upload_bytes(b"over TLS")
        assert client.download_bytes(ref) == b"over TLS"
    conf = net.netdir / "broker" / "mosquitto.conf"
    if net.broker_kind == "mosquitto":  # one listener, and it has the TLS lines
        text = conf.read_text()
        assert text.count("\nlistener ") == 1 and "certfile" in text and "require_certificate false" in text


def test_a_plain_mqtt_connection_is_refused_on_the_tls_listener(net: NetworkHandle) -> None:
    plain = _with_tls(net.credentials("r1"), None)
    assert not broker_accepts(plain.mqtt, timeout=3)
    with pytest.raises(BrokerUnavailable, match="plain TCP: a network with TLS on refuses it"):
        Messaging("r1", plain.mqtt, on_message=lambda *_: None).start(timeout=5)
    # the raw bytes of an MQTT CONNECT get no CONNACK (0x20) back
    with socket.create_connection(("127.0.0.1", net.mqtt_port), 5) as s:
        s.sendall(bytes.fromhex("101000044d5154540402003c00047231"))
        s.settimeout(5)
        try:
            answer = s.recv(16)
        except (ConnectionResetError, TimeoutError):
            answer = b""
        assert not answer.startswith(b"\x20")
    assert broker_accepts(net.credentials("r1").mqtt)  # and the broker is still fine


def test_a_client_that_does_not_trust_the_ca_refuses_the_servers(
    net: NetworkHandle, rogue: pki.CertificateAuthority
) -> None:
    creds = _with_tls(net.credentials("r1"), TlsSettings(ca=rogue.pem))
    assert not broker_accepts(creds.mqtt, timeout=3)
    with FileStoreClient(creds.filestore) as client, pytest.raises(BlobTransferError, match="no TLS connection"):
        client.upload_bytes(b"to an impostor?")
    with pytest.raises(requests.exceptions.SSLError):  # the system's CAs do not vouch for the store either
        requests.get(f"{net.filestore_url}/api/v1/health", timeout=5)


class Impostor:
    """A TLS server on a free port that answers with a given certificate, then hangs up."""

    def __init__(self, cert_pem: str, key_pem: str, folder: Path) -> None:
        (folder / "impostor.pem").write_text(cert_pem + key_pem)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(folder / "impostor.pem")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError):
                self.ctx.wrap_socket(conn, server_side=True).close()
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_party_certificate_cannot_pose_as_the_servers(net: NetworkHandle, tmp_path: Path) -> None:
    """A party holds a certificate of the consortium CA; serving with it on the network's address
    (say, after taking the port over) convinces no client: it names a party, not the servers' host."""
    party = net.credentials("a").tls
    assert party is not None and party.cert and party.key
    impostor = Impostor(party.cert, party.key, tmp_path)
    try:
        creds = net.credentials("r1")
        assert not broker_accepts(creds.mqtt.model_copy(update={"port": impostor.port}), timeout=3)
        fake = creds.filestore.model_copy(update={"url": f"https://127.0.0.1:{impostor.port}"})
        with FileStoreClient(fake) as client, pytest.raises(BlobTransferError, match="no TLS connection"):
            client.upload_bytes(b"to an impostor")
    finally:
        impostor.close()


def test_a_server_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    """A server certificate from the trusted CA, but for another name, convinces neither client."""
    ca = pki.CertificateAuthority.ensure(tmp_path / "pki")
    key = pki.new_key()
    impostor = Impostor(pki.cert_pem(ca.issue("server", "server", key.public_key(), ["files.example.org"])),
                        pki.key_pem(key), tmp_path)  # fmt: skip
    try:
        creds = _with_tls(Credentials.model_validate({
            "party": "r1", "role": "researcher", "mqtt": {"port": impostor.port, "username": "r1", "password": "p"},
            "filestore": {"url": f"https://127.0.0.1:{impostor.port}", "token": "t"},
        }), ca.party_tls("r1", "researcher"))  # fmt: skip
        assert not broker_accepts(creds.mqtt, timeout=3)
        with FileStoreClient(creds.filestore) as client, pytest.raises(BlobTransferError, match="no TLS connection"):
            client.health()
    finally:
        impostor.close()


def test_a_wrong_password_is_refused_over_tls(net: NetworkHandle) -> None:
    creds = net.credentials("r1")
    wrong = creds.mqtt.model_copy(update={"password": "not-the-password"})
    assert wrong.tls is not None
    assert not broker_accepts(wrong, timeout=3)
    with pytest.raises(BrokerUnavailable, match=r"(?i)password|not authori[sz]ed|refused"):
        Messaging("r1", wrong, on_message=lambda *_: None).start(timeout=5)


def test_the_file_store_refuses_plain_http_and_serves_https(net: NetworkHandle) -> None:
    creds = net.credentials("r1")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{_plain_http(creds)}/api/v1/health", timeout=5)
    assert requests.get(f"{net.filestore_url}/api/v1/health", timeout=5, verify=net.ca_path).status_code == 200
    token = {"Authorization": f"Token {creds.filestore.token}"}
    with pytest.raises(requests.ConnectionError):  # with a valid token too: the token never crosses in clear
        requests.put(f"{_plain_http(creds)}/api/v1/blobs/{'0' * 64}", data=b"x", headers=token, timeout=5)


def test_the_file_store_refuses_an_oversized_body_before_reading_it(net: NetworkHandle) -> None:
    """uvicorn would read any body whole; the store's handler answers 413 on the Content-Length alone."""
    creds = net.credentials("r1")
    cfg = provision.load_config(net.netdir)
    host, port = creds.filestore.url.rsplit("//", 1)[1].rsplit(":", 1)
    assert creds.filestore.tls is not None
    with socket.create_connection((host, int(port)), 10) as raw, pki.client_context(creds.filestore.tls).wrap_socket(
        raw, server_hostname=host
    ) as s:
        token, length = creds.filestore.token, cfg.max_upload_bytes + (64 << 20) + 1
        s.sendall(f"PUT /api/v1/blobs/{'0' * 64} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode())  # fmt: skip
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 413")  # answered with no body byte sent
    assert list((net.netdir / "filestore" / "tmp").iterdir()) == []


def test_stalled_downloads_do_not_hold_blobs_in_the_stores_memory(net: NetworkHandle) -> None:
    """Django's ASGI handler would read a file response whole into memory before sending it (a sync iterator
    is consumed with list()); the store sends it a block at a time as the client reads. Eight readers that
    never read a 16 MiB blob would hold 128 MiB the first way, a few block buffers the second."""
    creds = net.credentials("r1")
    assert creds.filestore.tls is not None
    with FileStoreClient(creds.filestore) as client:
        ref = client.upload_bytes(os.urandom(16 << 20))
    store = psutil.Process(net.read_state()["filestore_pid"])
    before = store.memory_info().rss
    host, port = creds.filestore.url.rsplit("//", 1)[1].rsplit(":", 1)
    ctx = pki.client_context(creds.filestore.tls)
    readers = []
    try:
        for _ in range(8):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect((host, int(port)))
            s = ctx.wrap_socket(raw, server_hostname=host)
            s.sendall(f"GET /api/v1/blobs/{ref.key} HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Token {creds.filestore.token}\r\n\r\n".encode())  # fmt: skip
            readers.append(s)
        s.settimeout(10)
        assert s.recv(64).startswith(b"HTTP/1.1 200")  # the last one is being answered
        time.sleep(1.0)  # not a timing assertion: lets the store fill whatever it would buffer
        grown = store.memory_info().rss - before
        assert grown < 48 << 20, f"the store grew by {grown >> 20} MiB for 8 stalled downloads of 16 MiB"
    finally:
        for s in readers:
            s.close()


def test_a_node_daemon_joins_from_its_kit(net: NetworkHandle, tmp_path: Path) -> None:
    archive = net.netdir / "kits" / "a.tar.gz"
    nodedir = tmp_path / "node-a"
    start_process([*FEDSILO, "node", "init", "--dir", str(nodedir), "--kit", str(archive), "--threads", "1"],
                  tmp_path / "init.log").wait(60)  # fmt: skip
    assert Credentials.load(nodedir / "network.json") == kits.load_kit(archive)
    node = start_node(nodedir)  # ready only once its daemon is connected to the broker, over TLS
    try:
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()


@pytest.mark.parametrize("broker", BROKERS)
def test_a_network_made_before_tls_switches_to_it_on_its_next_start(broker: str, tmp_path: Path) -> None:
    netdir = tmp_path / "network"
    provision.init_network(netdir, mqtt_port=free_port(), http_port=free_port(), broker=broker, tls=False)  # type: ignore[arg-type]
    before = provision.add_party(netdir, "old-node", "node")
    toml = netdir / "network.toml"  # as written before network.toml had a tls key
    toml.write_text("".join(line for line in toml.read_text().splitlines(True) if "tls" not in line))
    assert before.tls is None and before.filestore.url.startswith("http://")
    handle = NetworkHandle(netdir=netdir, broker=broker, log_path=tmp_path / "network.log")
    handle.start()
    try:
        after = handle.credentials("old-node")
        assert after.tls is not None and after.filestore.url.startswith("https://")
        assert after.mqtt.password == before.mqtt.password and after.filestore.token == before.filestore.token
        assert broker_accepts(after.mqtt) and not broker_accepts(before.mqtt, timeout=3)
        with FileStoreClient(after.filestore) as client:
            assert client.download_bytes(client.upload_bytes(b"upgraded")) == b"upgraded"
    finally:
        handle.stop()


# ------------------------------------------------------------------------------------ mutual TLS
def test_mutual_tls_refuses_a_client_without_a_certificate(mutual: NetworkHandle) -> None:
    creds = mutual.credentials("r1")
    assert creds.tls is not None and creds.tls.cert
    anonymous = _with_tls(creds, TlsSettings(ca=creds.tls.ca))  # trusts the CA, presents nothing
    assert not broker_accepts(anonymous.mqtt, timeout=3)
    with FileStoreClient(anonymous.filestore) as client, pytest.raises(BlobTransferError):
        client.upload_bytes(b"no certificate")
    assert broker_accepts(creds.mqtt)  # the party's own certificate from its kit is accepted
    with FileStoreClient(creds.filestore) as client:
        assert client.download_bytes(client.upload_bytes(b"with a certificate")) == b"with a certificate"


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mutual: NetworkHandle, rogue: pki.CertificateAuthority
) -> None:
    creds = mutual.credentials("r1")
    assert creds.tls is not None
    forged = _with_tls(creds, TlsSettings(ca=creds.tls.ca, **_pair(rogue, "r1")))
    assert not broker_accepts(forged.mqtt, timeout=3)
    with FileStoreClient(forged.filestore) as client, pytest.raises(BlobTransferError):
        client.upload_bytes(b"forged certificate")


def _pair(ca: pki.CertificateAuthority, name: str) -> dict[str, str]:
    tls = ca.party_tls(name, "researcher")
    assert tls.cert and tls.key
    return {"cert": tls.cert, "key": tls.key}


def test_network_status_probes_under_mutual_tls(mutual: NetworkHandle, tmp_path: Path) -> None:
    proc = start_process([*FEDSILO, "network", "status", "--dir", str(mutual.netdir)], tmp_path / "status.log")
    assert proc.wait(60) == 0, (tmp_path / "status.log").read_text()
    assert "up" in (tmp_path / "status.log").read_text()
