"""The file store against parties with valid tokens and bad intentions (issue 7 §5), no mocks:
slow clients, reading what is not yours, filling the disk, and retention (`fedsilo network gc`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from fedsilo.common.errors import TransferError
from fedsilo.common.processes import FEDSILO, free_port
from fedsilo.network import provision
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.pki import client_context
from tests.support.procs import NetworkHandle

QUOTA_BLOBS = 12
QUOTA_BYTES = 24 << 20
LIVENESS_S = 5.0
"""A generous bound: a probe answered later than this means a slow client held the store."""


def _start(base: Path, **config: float) -> NetworkHandle:
    """A network whose network.toml sets `config` (quotas, retention) before its first start."""
    netdir = base / "network"
    provision.init_network(netdir, mqtt_port=free_port(), http_port=free_port(), broker="embedded",
                           max_upload_bytes=16 << 20)  # fmt: skip
    provision.save_config(netdir, provision.load_config(netdir).model_copy(update=config))
    for name in ("node-a", "node-b", "greedy", "racer"):
        provision.add_party(netdir, name, "node")
    handle = NetworkHandle(netdir=netdir, broker="embedded", log_path=base / "network.log")
    handle.start()
    return handle


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = _start(tmp_path_factory.mktemp("fs-hostile"), quota_blobs=QUOTA_BLOBS, quota_bytes=QUOTA_BYTES)
    yield handle
    handle.stop()


def _client(net: NetworkHandle, party: str) -> FileStoreClient:
    return FileStoreClient(net.credentials(party).filestore)


@pytest.fixture(scope="module")
def researcher(net: NetworkHandle) -> Iterator[FileStoreClient]:
    with _client(net, "researcher") as c:
        yield c


@pytest.fixture(scope="module")
def node_a(net: NetworkHandle) -> Iterator[FileStoreClient]:
    with _client(net, "node-a") as c:
        yield c


@pytest.fixture(scope="module")
def node_b(net: NetworkHandle) -> Iterator[FileStoreClient]:
    with _client(net, "node-b") as c:
        yield c


def _raw(net: NetworkHandle, method: str, sha: str, party: str, suffix: str = "", **kw: object) -> requests.Response:
    headers = {"Authorization": f"Token {net.credentials(party).filestore.token}", **kw.pop("headers", {})}
    url = f"{net.filestore_url}/api/v1/blobs/{sha}{suffix}"
    return requests.request(method, url, headers=headers, timeout=10, verify=net.ca_path, **kw)


def _blob_file(net: NetworkHandle, key: str) -> Path:
    return net.netdir / "filestore" / "blobs" / key[-64:-62] / key


# ------------------------------------------------------------------------------------ slow clients
class Tricklers:
    """Connections that send one byte every half second (headers, or an upload's body), and
    connections that ask for a large blob and never read it; all closed on `stop()` or after 60 s."""

    def __init__(self, addr: tuple[str, int], tls: ssl.SSLContext) -> None:
        self.addr = addr
        self.tls = tls
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def open(self, head: bytes, rcvbuf: int | None = None) -> None:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(self.addr)
        s = self.tls.wrap_socket(s, server_hostname=self.addr[0])
        s.sendall(head)
        self.socks.append(s)

    def start(self) -> None:
        self._thread.start()

    def _trickle(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.wait(0.5) and time.monotonic() < deadline:
            for s in self.socks:
                with contextlib.suppress(OSError):  # closed by the server: it may, that is its defence
                    s.send(b"x")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def test_slow_clients_do_not_hold_the_store(net: NetworkHandle, researcher: FileStoreClient) -> None:
    big = researcher.upload_bytes(os.urandom(8 << 20))
    host, port = net.filestore_url.rsplit("//", 1)[1].rsplit(":", 1)
    token = net.credentials("researcher").filestore.token
    slow = Tricklers((host, int(port)), client_context(net.credentials("researcher").filestore.tls))
    try:
        for i in range(12):  # no token needed to trickle headers
            slow.open(f"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode())
        for _ in range(16):  # authenticated uploads trickling their bodies
            sha = hashlib.sha256(os.urandom(8)).hexdigest()
            slow.open(f"PUT /api/v1/blobs/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\n"
                      f"Content-Length: {1 << 20}\r\n\r\n".encode())  # fmt: skip
        for _ in range(8):  # downloads of 8 MiB by readers that never read
            slow.open(f"GET /api/v1/blobs/{big.key} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\n\r\n"
                      .encode(), rcvbuf=4096)  # fmt: skip
        slow.start()
        time.sleep(1.0)  # every slow request has reached the server
        probe = FileStoreClient(net.credentials("node-a").filestore)
        for _ in range(3):
            t0 = time.monotonic()
            assert requests.get(f"{net.filestore_url}/api/v1/health", timeout=LIVENESS_S,
                                verify=net.ca_path).status_code == 200  # fmt: skip
            data = os.urandom(1000)
            ref = probe.upload_bytes(data)
            assert probe.download_bytes(ref) == data
            assert time.monotonic() - t0 < LIVENESS_S
        probe.close()
    finally:
        slow.stop()


# ------------------------------------------------------------------------------------ read access
def test_a_node_cannot_read_another_nodes_update(
    net: NetworkHandle, node_a: FileStoreClient, node_b: FileStoreClient, researcher: FileStoreClient
) -> None:
    update = node_a.upload_bytes(b"node-a's update " + os.urandom(64), readers=["researcher"])
    never = hashlib.sha256(b"never stored anywhere").hexdigest()
    assert researcher.download_bytes(update).startswith(b"node-a's update")
    assert node_a.download_bytes(update).startswith(b"node-a's update")
    with pytest.raises(BlobTransferError) as err:
        node_b.download_bytes(update)
    assert err.value.status == 404
    assert not node_b.exists(update.key)
    # the refusal looks exactly like a blob that does not exist: a token cannot probe what is stored
    hidden, missing = _raw(net, "GET", update.key, "node-b"), _raw(net, "GET", never, "node-b")
    assert (hidden.status_code, hidden.json()["error"].replace(update.key, "SHA")) == (
        missing.status_code, missing.json()["error"].replace(never, "SHA"))  # fmt: skip
    # nor can node-b grant itself what it cannot read, or guess its way in with a HEAD-then-grant
    assert _raw(net, "POST", update.key, "node-b", "/readers", json={"readers": ["node-b"]}).status_code == 404
    assert _raw(net, "POST", update.key, "researcher", "/readers", json={"readers": ["node-b"]}).status_code == 404
    with pytest.raises(BlobTransferError):
        node_b.download_bytes(update)


def test_blobs_are_read_by_the_readers_named_and_granted(
    net: NetworkHandle, researcher: FileStoreClient, node_a: FileStoreClient, node_b: FileStoreClient
) -> None:
    plan = researcher.upload_bytes(b"class Plan: ...  # " + os.urandom(16), readers=["node-a"])
    big = researcher.upload_bytes(os.urandom(2 << 20), readers=["node-a"])  # HEAD first, then PUT
    for ref in (plan, big):
        assert node_a.download_bytes(ref) is not None
        with pytest.raises(BlobTransferError, match="HTTP 404"):
            node_b.download_bytes(ref)
    # a later round samples node-b: the same blobs, granted, not sent again
    researcher.ensure_readers(plan, ["node-a", "node-b"])
    with _client(net, "researcher") as restarted:  # a new researcher process re-uploading a large blob
        restarted.upload_bytes(_blob_file(net, big.key).read_bytes(), readers=["node-b"])  # HEAD: a grant
    assert node_b.download_bytes(plan) == node_a.download_bytes(plan)
    assert node_b.download_bytes(big) == node_a.download_bytes(big)
    # a granted reader may read but not grant further
    r = _raw(net, "POST", plan.key, "node-a", "/readers", json={"readers": ["greedy"]})
    assert r.status_code == 404


def test_uploading_the_bytes_makes_a_party_a_reader(node_a: FileStoreClient, node_b: FileStoreClient) -> None:
    data = b"the same content, twice " + os.urandom(32)
    ref = node_a.upload_bytes(data)
    assert node_b.upload_bytes(data) == ref  # node-b proved it holds the bytes
    assert node_b.download_bytes(ref) == data


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("nobody-registered", "unknown reader"),
        ("node-a,../etc", "not a party name"),
        (",".join(f"n{i}" for i in range(1001)), "at most 1000"),
    ],
)
def test_readers_must_be_registered_parties(net: NetworkHandle, header: str, message: str) -> None:
    body = os.urandom(100)
    sha = hashlib.sha256(body).hexdigest()
    r = _raw(net, "PUT", sha, "node-a", data=body, headers={"X-Fedsilo-Readers": header})
    assert r.status_code == 400 and message in r.json()["error"]
    assert not _blob_file(net, sha).exists()


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[" * 5000 + b"]" * 5000, b'{"readers": "node-b"}', b'{"readers": [1]}', b"{}"]
)
def test_grant_bodies_are_checked(net: NetworkHandle, node_a: FileStoreClient, body: bytes) -> None:
    ref = node_a.upload_bytes(b"granted carefully")
    r = _raw(net, "POST", ref.key, "node-a", "/readers", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "error" in r.json()


# ------------------------------------------------------------------------------------ quotas
def test_a_greedy_party_meets_its_blob_quota(net: NetworkHandle) -> None:
    with _client(net, "greedy") as greedy:
        refs = [greedy.upload_bytes(f"blob {i}".encode()) for i in range(QUOTA_BLOBS)]
        with pytest.raises(TransferError) as err:
            greedy.upload_bytes(b"one too many")
        assert err.value.status == 507
        assert f"quota exceeded: party 'greedy' stores {QUOTA_BLOBS} blobs" in str(err.value)
        assert greedy.upload_bytes(b"blob 0") == refs[0]  # its own blobs stay re-uploadable (idempotent)
        # gc gives the room back: expire one, collect, upload again
        _backdate(net, refs[0].key, days=30)
        _gc(net)
        assert greedy.upload_bytes(b"now it fits").size == len(b"now it fits")


def test_the_byte_quota_holds_under_concurrent_uploads(net: NetworkHandle) -> None:
    size = 8 << 20  # QUOTA_BYTES is 24 MiB: three of eight concurrent 8 MiB uploads fit
    with _client(net, "racer") as racer, ThreadPoolExecutor(8) as pool:
        def upload(_: int) -> int:
            try:
                racer.upload_bytes(os.urandom(size))
            except BlobTransferError as exc:
                assert "quota exceeded" in exc.server_message and f"quota of {QUOTA_BYTES} bytes" in str(exc)
                return exc.status or 0
            return 201

        statuses = sorted(pool.map(upload, range(8)))
    assert statuses == [201] * 3 + [507] * 5


# ------------------------------------------------------------------------------------ retention
def _backdate(net: NetworkHandle, sha: str, days: float) -> None:
    """Pretend a blob was last used `days` ago (the store's own clock is not ours to move)."""
    when = (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with contextlib.closing(sqlite3.connect(net.netdir / "filestore" / "db.sqlite3", timeout=20)) as db, db:
        assert db.execute("UPDATE filestore_blob SET last_used_at = ? WHERE key = ?", (when, sha)).rowcount == 1


def _gc(net: NetworkHandle, *args: str) -> str:
    done = subprocess.run([*FEDSILO, "network", "gc", "--dir", str(net.netdir), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gc_removes_expired_blobs_and_keeps_used_ones(
    net: NetworkHandle, researcher: FileStoreClient, node_a: FileStoreClient
) -> None:
    old_plan = b"a plan nobody used for 8 days " + os.urandom(8)
    expired = researcher.upload_bytes(old_plan, readers=["node-a"])
    read = researcher.upload_bytes(b"parameters read a moment ago " + os.urandom(8), readers=["node-a"])
    fresh = researcher.upload_bytes(b"parameters of the round running now " + os.urandom(8))
    for ref in (expired, read):
        _backdate(net, ref.key, days=8)
    node_a.download_bytes(read)  # a read is a use: the round that needs it keeps it

    dry = _gc(net, "--dry-run")
    assert "would remove" in dry and _blob_file(net, expired.key).exists()
    out = _gc(net)
    assert f"removed 1 blob(s), {expired.size} bytes" in out
    assert "uploaded by" in out and "researcher" in out
    assert not _blob_file(net, expired.key).exists()
    with pytest.raises(BlobTransferError, match="HTTP 404"):
        researcher.download_bytes(expired)
    assert node_a.download_bytes(read).startswith(b"parameters read")
    assert researcher.download_bytes(fresh).startswith(b"parameters of the round")
    # and it can be stored again afterwards, as if new
    assert researcher.upload_bytes(old_plan) == expired
    assert researcher.download_bytes(expired) == old_plan


def test_the_running_store_collects_periodically(tmp_path: Path) -> None:
    net = _start(tmp_path, gc_interval_s=1.0)
    try:
        with _client(net, "node-b") as node_b:
            gone = node_b.upload_bytes(b"left behind by a finished job " + os.urandom(8))
            kept = node_b.upload_bytes(b"used by the round running now " + os.urandom(8))
            _backdate(net, gone.key, days=8)
            deadline = time.monotonic() + 30
            while _blob_file(net, gone.key).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _blob_file(net, gone.key).exists()
            assert not node_b.exists(gone.key)
            assert node_b.exists(kept.key)
    finally:
        net.stop()


def test_gc_refuses_a_directory_that_is_not_a_network(tmp_path: Path) -> None:
    done = subprocess.run([*FEDSILO, "network", "gc", "--dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 1 and "not a network directory" in done.stderr


# ------------------------------------------------------------------------------------ no token, no body
@pytest.mark.parametrize("method,path", [("PUT", "/api/v1/blobs/" + "ab" * 32), ("POST", "/api/v1/blobs")])
@pytest.mark.parametrize("auth", ["", "Authorization: Token not-a-token\r\n", "Authorization: Basic eDp5\r\n"])
def test_an_upload_without_a_valid_token_is_refused_before_its_body(net: NetworkHandle, method: str, path: str,
                                                                    auth: str) -> None:  # fmt: skip
    """The 401 comes while the 50 MB body is still unsent: nothing of it reaches the store's disk (Django's
    authentication runs only once a body has arrived whole, so the store used to spool it first)."""
    host, port = net.filestore_url.rsplit("//", 1)[1].rsplit(":", 1)
    tmp_before = set(os.listdir(net.netdir / "filestore" / "tmp"))
    tls = client_context(net.credentials("researcher").filestore.tls)
    raw = socket.create_connection((host, int(port)), timeout=30)
    with raw, tls.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 50000000\r\n\r\n".encode()
                  + os.urandom(65536))  # fmt: skip
        answer = ""
        while "}" not in answer and (chunk := s.recv(4096)):  # the head, then the JSON body
            answer += chunk.decode("latin-1")
    assert answer.startswith("HTTP/1.1 401") and "invalid token" in answer
    assert set(os.listdir(net.netdir / "filestore" / "tmp")) <= tmp_before
