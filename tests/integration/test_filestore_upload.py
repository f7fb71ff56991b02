"""`POST /api/v1/blobs` (issue 11): large blobs hashed by the client while it sends them, named by the store
from what it received; against cut-off bodies, wrong lengths, huge numbers, quotas and a store killed mid-upload."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from fedsilo.common.buffers import BufferPool
from fedsilo.common.hashing import digest_bytes
from fedsilo.common.serialization import params_from_bytes, params_to_buffers
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.messages import BlobRef
from fedsilo.network.pki import client_context
from tests.integration.test_filestore_hostile import _start
from tests.support.procs import NetworkHandle

LIMIT = 16 << 20  # the limit `_start` sets
QUOTA_BYTES = 40 << 20


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = _start(tmp_path_factory.mktemp("fs-upload"), quota_bytes=QUOTA_BYTES)
    yield handle
    handle.stop()


def _client(net: NetworkHandle, party: str = "researcher") -> FileStoreClient:
    return FileStoreClient(net.credentials(party).filestore)


def _spools(net: NetworkHandle) -> list[str]:
    """Upload spools still in the store's tmp folder, once those of finished requests are gone: the store
    closes a request's spool after it has sent the answer, so the client may read it a moment before."""
    tmp = net.netdir / "filestore" / "tmp"
    deadline = time.monotonic() + 10
    while (left := [p.name for p in tmp.iterdir() if p.name.startswith("put.")]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _blob_count(net: NetworkHandle) -> int:
    return sum(1 for _ in (net.netdir / "filestore" / "blobs").glob("??/*"))


def _raw_post(net: NetworkHandle, head: str, body: bytes = b"", read: bool = True) -> tuple[int, dict]:
    """Send a hand-made POST over TLS: headers (without the request line) and `body` as given; the answer
    as (status, JSON) or (0, {}) when the store closed the connection without one (or `read` is False)."""
    host, port = net.filestore_url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        tls = client_context(net.credentials("researcher").filestore.tls).wrap_socket(raw, server_hostname=host)
        tls.sendall(f"POST /api/v1/blobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}\r\n".encode() + body)
        if not read:
            return 0, {}
        answer = b""
        with contextlib.suppress(OSError):  # a refused upload may be cut off by the store after its answer
            while chunk := tls.recv(65536):  # `Connection: close`: the store closes after its answer
                answer += chunk
    if not answer:
        return 0, {}
    head, _, payload = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    try:
        return int(answer.split()[1]), json.loads(payload or b"{}")
    except ValueError:
        return int(answer.split()[1]), {"text": payload.decode(errors="replace")}


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def _auth(net: NetworkHandle, party: str = "researcher") -> str:
    return f"Authorization: Token {net.credentials(party).filestore.token}\r\n"


def test_a_large_blob_is_hashed_while_sent_and_named_by_the_store(net: NetworkHandle) -> None:
    data = os.urandom(6 << 20)
    with _client(net) as researcher, _client(net, "node-a") as node:
        ref = researcher.upload_bytes(data, readers=["node-a"])
        assert ref == BlobRef(blake3=digest_bytes(data, "blake3"), size=len(data))
        assert node.download_bytes(ref) == data  # the readers header of the POST was applied
        assert researcher.upload_bytes(data) == ref  # sent again: stored once, answered 200
    assert _spools(net) == []


def test_parameters_are_sent_from_tensor_memory(net: NetworkHandle) -> None:
    params = {"w": torch.randn(1000, 600), "b": torch.arange(600, dtype=torch.int64)}
    payload = params_to_buffers(params)
    with _client(net) as researcher:
        ref = researcher.upload_bytes(payload)
        assert ref.blake3 == digest_bytes(payload.tobytes(), "blake3") == payload.digest("blake3")
        back = params_from_bytes(researcher.download_buffer(ref), copy=False)
    assert torch.equal(back["w"], params["w"]) and torch.equal(back["b"], params["b"])


def test_downloads_into_a_pool_reuse_a_buffer_only_once_it_is_dropped(net: NetworkHandle) -> None:
    """The researcher's download buffers (`researcher.fetch.RECEIVE_BUFFERS`): a held update keeps its bytes."""
    one = params_to_buffers({"w": torch.full((1000, 1200), 1.0)})
    two = params_to_buffers({"w": torch.full((1000, 1200), 2.0)})
    pool = BufferPool()
    with _client(net) as researcher:
        first_ref, second_ref = researcher.upload_bytes(one), researcher.upload_bytes(two)
        first = params_from_bytes(researcher.download_buffer(first_ref, pool=pool), copy=False)
        second = params_from_bytes(researcher.download_buffer(second_ref, pool=pool), copy=False)
        assert torch.all(first["w"] == 1.0) and torch.all(second["w"] == 2.0)  # held: two buffers
        address = first["w"].data_ptr()
        del first
        third = params_from_bytes(researcher.download_buffer(second_ref, pool=pool), copy=False)
    assert third["w"].data_ptr() == address  # the dropped buffer, filled again
    assert torch.all(second["w"] == 2.0) and torch.all(third["w"] == 2.0)


@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        (f"Content-Length: {10**15}\r\n", b"", 413),  # refused before a byte of the body is read
        (f"Content-Length: {10**30}\r\n", b"", 400),  # more digits than h11 takes
        (f"Content-Length: {LIMIT + 1}\r\n", os.urandom(LIMIT + 1), 413),  # read and dropped, then a JSON 413
        ("Content-Length: -5\r\n", b"", 400),
        ("Content-Length: 12\r\nX-Fedsilo-Readers: nobody-registered\r\n", b"twelve bytes", 400),
        ("Content-Length: 3\r\nX-Fedsilo-Readers: a b\r\n", b"abc", 400),
    ],
    ids=["huge-length", "absurd-length", "over-limit", "negative-length", "unknown-reader", "bad-reader-name"],
)
def test_refused_posts_store_nothing(net: NetworkHandle, head: str, body: bytes, status: int) -> None:
    before = _blob_count(net)
    got, answer = _raw_post(net, _auth(net) + head, body)
    assert got == status, answer
    assert _blob_count(net) == before and _spools(net) == []


def test_a_post_without_a_token_is_401_and_stores_nothing(net: NetworkHandle) -> None:
    before = _blob_count(net)
    assert _raw_post(net, "Content-Length: 5\r\n", b"hello")[0] == 401
    assert _blob_count(net) == before and _spools(net) == []


def test_a_chunked_post_is_stored_under_its_hash(net: NetworkHandle) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    status, answer = _raw_post(net, _auth(net) + "Transfer-Encoding: chunked\r\n", body)
    sha = hashlib.sha256(b"hello world").hexdigest()  # a POST naming no digest: sha256, as before BLAKE3
    assert status == 201 and answer == {"key": sha, "sha256": sha, "size": 11}


@pytest.mark.parametrize("sent", [0, 1, 100_000, (2 << 20) - 1])
def test_cut_off_posts_store_nothing(net: NetworkHandle, sent: int) -> None:
    before = _blob_count(net)
    _raw_post(net, _auth(net) + f"Content-Length: {2 << 20}\r\n", os.urandom(sent), read=False)
    with _client(net) as researcher:  # served after the cut: the spool of the cut body is gone by then
        researcher.upload_bytes(os.urandom(2 << 20))
    assert _blob_count(net) == before + 1 and _spools(net) == []


def test_a_body_longer_than_announced_is_not_stored_whole(net: NetworkHandle) -> None:
    data = os.urandom(3 << 20)
    status, answer = _raw_post(net, _auth(net) + f"Content-Length: {1 << 20}\r\n", data)
    # h11 reads the bytes past the announced length as a next request and refuses them (400); the announced
    # bytes may have been stored before that, as the blob they are, never more
    assert status in (201, 400), answer
    if status == 201:
        assert answer == {"sha256": hashlib.sha256(data[: 1 << 20]).hexdigest(), "size": 1 << 20}
    with _client(net) as researcher:
        assert not researcher.exists(hashlib.sha256(data).hexdigest())
        assert researcher.upload_bytes(data).size == len(data)  # the store serves on
    assert _spools(net) == []


def test_the_byte_quota_holds_for_posts(net: NetworkHandle) -> None:
    with _client(net, "greedy") as greedy:
        for _ in range(QUOTA_BYTES // (8 << 20)):
            greedy.upload_bytes(os.urandom(8 << 20))
        with pytest.raises(BlobTransferError) as err:
            greedy.upload_bytes(os.urandom(8 << 20))
    assert err.value.status == 507 and "quota exceeded: party 'greedy'" in str(err.value)
    assert _spools(net) == []


class _StallingPayload:
    """A blob that sends its first MiB, then waits for `go` before the rest (a `Payload`)."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)
        self.started, self.go = threading.Event(), threading.Event()

    def digest(self, algorithm: str) -> str:
        return digest_bytes(self.data, algorithm)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: 1 << 20]
        self.started.set()
        self.go.wait(60)
        yield self.data[1 << 20 :]


def test_a_store_killed_mid_upload_fails_it_clearly_and_serves_again(net: NetworkHandle) -> None:
    """Last: restarts the store."""
    payload, failures = _StallingPayload(4 << 20), []
    client = _client(net)

    def upload() -> None:
        try:
            client.upload_bytes(payload)
        except BlobTransferError as exc:
            failures.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    assert payload.started.wait(30)
    net.kill_filestore(wait=True)  # kill -9; the network restarts it
    payload.go.set()
    thread.join(60)
    assert not thread.is_alive() and len(failures) == 1
    assert "file store upload" in str(failures[0])
    with _client(net) as again:
        key = f"blake3-{digest_bytes(payload.data, 'blake3')}"
        assert not again.exists(key)  # nothing of the cut upload was stored
        assert again.upload_bytes(payload.data).key == key
    client.close()

