"""The file store under uvicorn, through raw HTTPS and through FileStoreClient (no mocks)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import requests

from fedsilo.common.errors import TransferError
from fedsilo.common.hashing import digest_bytes
from fedsilo.network.credentials import FileStoreSettings
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.messages import BlobRef
from tests.support.procs import NetworkHandle, start_network

LIMIT_MB = 8


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> NetworkHandle:
    handle = start_network(tmp_path_factory.mktemp("fs"), broker="embedded", max_upload_mb=LIMIT_MB)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REQUESTS_CA_BUNDLE", str(handle.ca_path))  # raw `requests` calls trust the network's CA
        yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(net: NetworkHandle) -> FileStoreClient:
    with FileStoreClient(net.credentials("researcher").filestore) as c:
        yield c


def _url(net: NetworkHandle, sha: str) -> str:
    return f"{net.filestore_url}/api/v1/blobs/{sha}"


def _auth(net: NetworkHandle) -> dict[str, str]:
    return {"Authorization": f"Token {net.credentials('researcher').filestore.token}"}


def _tmp_files(net: NetworkHandle) -> list[str]:
    return os.listdir(net.netdir / "filestore" / "tmp")


def test_health_needs_no_token(net: NetworkHandle) -> None:
    r = requests.get(f"{net.filestore_url}/api/v1/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["max_upload_bytes"] == LIMIT_MB << 20


def test_roundtrip_small(client: FileStoreClient) -> None:
    data = os.urandom(200_000)
    ref = client.upload_bytes(data)
    assert ref == BlobRef(blake3=digest_bytes(data, "blake3"), size=len(data))
    assert client.exists(ref.key)
    assert client.download_bytes(ref) == data


def test_roundtrip_multi_mib_streamed(client: FileStoreClient, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 << 20))
    ref = client.upload_file(src)
    assert ref.size == 6 << 20
    out = client.download_to(ref, tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name != "copy.bin"]  # no temp file left


def test_a_node_reads_what_the_researcher_stored_for_it(net: NetworkHandle, client: FileStoreClient) -> None:
    node = net.add_party("fs-node", "node")
    ref = client.upload_bytes(b"global parameters", readers=["fs-node"])
    with FileStoreClient(node.filestore) as node_client:
        assert node_client.download_bytes(ref) == b"global parameters"


def test_missing_token_is_401(net: NetworkHandle) -> None:
    r = requests.get(_url(net, "0" * 64))
    assert r.status_code == 401
    assert "error" in r.json()
    r = requests.put(_url(net, hashlib.sha256(b"x").hexdigest()), data=b"x")
    assert r.status_code == 401


def test_wrong_token_is_401(net: NetworkHandle) -> None:
    r = requests.get(_url(net, "0" * 64), headers={"Authorization": "Token not-a-real-token"})
    assert r.status_code == 401
    assert "invalid token" in r.json()["error"]
    r = requests.get(_url(net, "0" * 64), headers={"Authorization": "Bearer abc"})
    assert r.status_code == 401


def test_over_limit_with_content_length_is_413(net: NetworkHandle) -> None:
    body = os.urandom((LIMIT_MB << 20) + 1)
    sha = hashlib.sha256(body).hexdigest()
    r = requests.put(_url(net, sha), data=body, headers=_auth(net))
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert requests.head(_url(net, sha), headers=_auth(net)).status_code == 404


def test_over_limit_chunked_is_413(net: NetworkHandle) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(LIMIT_MB + 1)]
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    r = requests.put(_url(net, sha), data=iter(chunks), headers=_auth(net))  # a generator: chunked encoding
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert requests.head(_url(net, sha), headers=_auth(net)).status_code == 404
    assert _tmp_files(net) == []


def test_chunked_under_limit_is_stored(net: NetworkHandle, client: FileStoreClient) -> None:
    chunks = [b"a" * 1000, b"b" * 5000]
    body = b"".join(chunks)
    r = requests.put(_url(net, hashlib.sha256(body).hexdigest()), data=iter(chunks), headers=_auth(net))
    assert r.status_code == 201
    answer = r.json()
    assert answer.pop("key") == answer["sha256"]
    assert client.download_bytes(BlobRef(**answer)) == body


def test_sha_mismatch_is_400_and_nothing_stored(net: NetworkHandle) -> None:
    claimed = hashlib.sha256(b"what I claim").hexdigest()
    r = requests.put(_url(net, claimed), data=b"what I send", headers=_auth(net))
    assert r.status_code == 400
    assert "sha256 mismatch" in r.json()["error"]
    assert requests.head(_url(net, claimed), headers=_auth(net)).status_code == 404
    assert not (net.netdir / "filestore" / "blobs" / claimed[:2] / claimed).exists()
    assert _tmp_files(net) == []


def test_not_a_sha_is_400(net: NetworkHandle) -> None:
    r = requests.get(_url(net, "../../etc/passwd"), headers=_auth(net))
    assert r.status_code in (400, 404)
    r = requests.get(_url(net, "abc"), headers=_auth(net))
    assert r.status_code == 400
    assert "is not a blob key" in r.json()["error"]


def test_reupload_is_idempotent(net: NetworkHandle, client: FileStoreClient) -> None:
    body = os.urandom(1000)
    url = _url(net, hashlib.sha256(body).hexdigest())
    assert requests.put(url, data=body, headers=_auth(net)).status_code == 201
    second = requests.put(url, data=body, headers=_auth(net))
    assert second.status_code == 200
    sha = hashlib.sha256(body).hexdigest()
    assert second.json() == {"key": sha, "sha256": sha, "size": 1000}
    assert client.upload_bytes(body) == client.upload_bytes(body)
    assert client.download_bytes(BlobRef(sha256=sha, size=1000)) == body


def test_unknown_blob_is_404(net: NetworkHandle, client: FileStoreClient) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()
    r = requests.get(_url(net, sha), headers=_auth(net))
    assert r.status_code == 404
    assert sha in r.json()["error"]
    assert not client.exists(sha)
    with pytest.raises(BlobTransferError) as err:
        client.download_bytes(BlobRef(sha256=sha, size=12))
    assert err.value.status == 404
    assert "HTTP 404" in str(err.value) and "no blob" in str(err.value)


def test_pickle_payload_is_only_bytes(net: NetworkHandle, client: FileStoreClient, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    payload = pickle.dumps(Trap())
    ref = client.upload_bytes(payload)
    assert client.download_bytes(ref) == payload
    assert not marker.exists()
    stored = net.netdir / "filestore" / "blobs" / ref.key[-64:-62] / ref.key
    assert stored.read_bytes() == payload


def test_tampered_blob_is_refused_by_the_client(net: NetworkHandle, client: FileStoreClient) -> None:
    ref = client.upload_bytes(b"honest parameters")
    stored = net.netdir / "filestore" / "blobs" / ref.key[-64:-62] / ref.key
    stored.write_bytes(b"evil parameters!!")
    with pytest.raises(TransferError, match="hashes to"):
        client.download_bytes(ref)
    with pytest.raises(TransferError, match="over the allowed"):
        client.download_bytes(ref, max_bytes=3)


def test_client_errors_are_readable(net: NetworkHandle) -> None:
    bad = FileStoreClient(net.credentials("researcher").filestore.model_copy(update={"token": "wrong"}))
    with pytest.raises(BlobTransferError) as err:
        bad.upload_bytes(b"data")
    assert err.value.status == 401
    with pytest.raises(BlobTransferError) as err:
        bad.download_bytes(BlobRef(sha256="0" * 64, size=1))
    assert err.value.status == 401
    assert "invalid token" in err.value.server_message
    assert "HTTP 401: invalid token" in str(err.value)

    down = FileStoreClient(FileStoreSettings(url="http://127.0.0.1:9", token="x"))
    with pytest.raises(BlobTransferError, match=r"cannot reach http://127\.0\.0\.1:9") as err:
        down.upload_bytes(b"data")
    assert err.value.status is None


def test_client_upload_over_limit_reports_413(net: NetworkHandle, client: FileStoreClient) -> None:
    with pytest.raises(BlobTransferError) as err:
        client.upload_bytes(os.urandom((LIMIT_MB << 20) + 10))
    assert err.value.status == 413
    assert "exceeds the file store limit" in str(err.value)
