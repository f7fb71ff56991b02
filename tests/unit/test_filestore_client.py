"""Upload decisions of the file-store client, without a server: when it asks first, when it just sends."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import blake3
import pytest

from fedsilo.common.hashing import BLOB_DIGEST, digest_bytes
from fedsilo.network import filestore_client
from fedsilo.network.credentials import FileStoreSettings
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient
from fedsilo.network.messages import BlobRef


class Recorder(FileStoreClient):
    def __init__(self, stored: bool, put_error: int | None = None) -> None:
        super().__init__(FileStoreSettings(url="http://127.0.0.1:9", token="t" * 32))
        self.stored, self.put_error, self.calls = stored, put_error, []

    def exists(self, key: str) -> bool:
        self.calls.append("HEAD")
        return self.stored

    def _post(self, data, readers, hold, digest) -> BlobRef:
        self.calls.append(f"POST {','.join(readers)}".strip())
        if self.put_error is not None:
            raise BlobTransferError("refused", status=self.put_error)
        return BlobRef.named(digest, digest_bytes(bytes(data), digest), len(data))

    def _put(self, ref, body, readers=(), hold=False) -> None:
        self.calls.append(f"PUT {','.join(readers)}".strip())
        if self.put_error is not None:
            raise BlobTransferError("refused", status=self.put_error)

    def grant(self, ref, readers) -> None:
        if readers:
            self.calls.append(f"GRANT {','.join(readers)}")


def test_small_blobs_are_sent_without_asking() -> None:
    client = Recorder(stored=True)
    ref = client.upload_bytes(b"parameters")
    assert client.calls == ["PUT"] and ref.size == len(b"parameters")


def test_large_blobs_are_hashed_while_sent_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    # hashing first, then asking, then sending kept the store idle while the client hashed (bench/blobs.py)
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", 4)
    client = Recorder(stored=True)
    ref = client.upload_bytes(b"large blob", readers=["node-b"])
    assert client.calls == ["POST node-b"] and ref.blake3 == blake3.blake3(b"large blob").hexdigest()
    assert ref.key == "blake3-" + ref.blake3 and ref.sha256 is None  # new blobs are named by BLAKE3


@pytest.mark.parametrize("small_blob", [1 << 20, 4])
def test_a_blob_asked_by_sha256_is_named_by_it(monkeypatch: pytest.MonkeyPatch, small_blob: int) -> None:
    """A plan is uploaded by its sha256 (the hash its data manager approves), by PUT or by POST alike."""
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", small_blob)
    ref = Recorder(stored=False).upload_bytes(b"class Plan: ...", digest="sha256")
    assert ref.sha256 == hashlib.sha256(b"class Plan: ...").hexdigest() == ref.key and ref.blake3 is None


def test_large_files_already_stored_are_not_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", 4)
    (tmp_path / "blob").write_bytes(b"large blob")
    stored, missing = Recorder(stored=True), Recorder(stored=False)
    stored.upload_file(tmp_path / "blob")
    missing.upload_file(tmp_path / "blob")
    assert stored.calls == ["HEAD"] and missing.calls == ["HEAD", "PUT"]


@pytest.mark.parametrize(("small_blob", "sent_by"), [(1 << 20, "PUT"), (4, "POST")])
def test_over_the_limit_but_stored_is_fine(monkeypatch: pytest.MonkeyPatch, small_blob: int, sent_by: str) -> None:
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", small_blob)
    client = Recorder(stored=True, put_error=413)
    ref = client.upload_bytes(b"stored before the limit was lowered", readers=["node-a"])
    assert client.calls == [f"{sent_by} node-a", "HEAD", "GRANT node-a"]
    assert ref.digest == digest_bytes(b"stored before the limit was lowered", BLOB_DIGEST)


def test_a_large_file_already_readable_is_granted_not_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # e.g. the same plan reused by a later round that samples another node
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", 4)
    (tmp_path / "blob").write_bytes(b"large blob")
    stored, missing = Recorder(stored=True), Recorder(stored=False)
    stored.upload_file(tmp_path / "blob", readers=["node-b"])
    missing.upload_file(tmp_path / "blob", readers=["node-b"])
    assert stored.calls == ["HEAD", "GRANT node-b"] and missing.calls == ["HEAD", "PUT node-b"]


@pytest.mark.parametrize("small_blob", [1 << 20, 2])
@pytest.mark.parametrize(("stored", "status"), [(False, 413), (True, 500), (True, 401)])
def test_other_failures_are_raised(monkeypatch: pytest.MonkeyPatch, small_blob: int, stored: bool, status: int) -> None:
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", small_blob)
    with pytest.raises(BlobTransferError):
        Recorder(stored=stored, put_error=status).upload_bytes(b"data")


class _LyingStore(http.server.BaseHTTPRequestHandler):
    """A store that reads each POST whole and names it with another digest (or another size)."""

    answer: dict = {}

    def do_POST(self) -> None:  # http.server names its handlers so
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(self.answer).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("lie", ["digest", "size", "not-json", "sha256 only"])
def test_a_store_naming_a_large_upload_otherwise_is_refused(monkeypatch: pytest.MonkeyPatch, lie: str) -> None:
    monkeypatch.setattr(filestore_client, "SMALL_BLOB", 4)
    data = b"what the client sent"
    honest = {"blake3": blake3.blake3(data).hexdigest(), "size": len(data)}
    lies = {"digest": {**honest, "blake3": "0" * 64}, "size": {**honest, "size": 5}, "not-json": [],
            # a store from before BLAKE3 ignores ?digest= and answers the sha256 it computed
            "sha256 only": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}  # fmt: skip
    handler = type("Handler", (_LyingStore,), {"answer": lies[lie]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with FileStoreClient(FileStoreSettings(url=url, token="t" * 32)) as client, \
                pytest.raises(BlobTransferError, match="this client sent 20 bytes hashing to"):  # fmt: skip
            client.upload_bytes(data)
    finally:
        server.shutdown()
        server.server_close()
