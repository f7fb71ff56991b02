"""The file store names blobs by BLAKE3 as well as sha256 (issue 11): a store upgraded with blobs in it still
serves them under their sha256, new blobs are keyed `blake3-<hex>`, and a key or digest that is not one of the
two, or a body that does not hash to its key, is refused with nothing stored."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import blake3
import pytest

from fedsilo.common.processes import free_port
from fedsilo.network import provision
from fedsilo.network.filestore_client import BlobTransferError, FileStoreClient, http_session
from fedsilo.network.messages import BlobRef
from tests.support.procs import NetworkHandle

OLD = b"a blob stored by a fedsilo from before BLAKE3"
OLD_SHA = hashlib.sha256(OLD).hexdigest()

_AT_0003 = """
import sys, django
from django.conf import settings
from fedsilo.network.filestore.settings import build_settings
settings.configure(**build_settings(sys.argv[1])); django.setup()
from django.core.management import call_command
from django.db import connection
call_command("migrate", "filestore", "0003", interactive=False, verbosity=0)
with connection.cursor() as cur:
    cur.execute("INSERT INTO filestore_blob (sha256, size, uploaded_by, created_at, last_used_at) "
                "VALUES (%s, %s, 'researcher', datetime('now'), datetime('now'))", [sys.argv[2], int(sys.argv[3])])
    for party, uploader in (("researcher", 1), ("node-a", 0)):  # handed over: node-a holds it until it releases
        cur.execute("INSERT INTO filestore_access (blob_id, party, uploader, uploads, holds) VALUES (%s, %s, %s, 1, 1)",
                    [sys.argv[2], party, uploader])
"""
"""A store database as the fedsilo before BLAKE3 left it (migrations up to 0003), holding one blob."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    base = tmp_path_factory.mktemp("fs-digests")
    netdir = base / "network"
    provision.init_network(netdir, mqtt_port=free_port(), http_port=free_port(), broker="embedded",
                           max_upload_bytes=16 << 20)  # fmt: skip
    provision.add_party(netdir, "node-a", "node")
    provision.add_party(netdir, "node-b", "node")
    subprocess.run([sys.executable, "-c", _AT_0003, str(netdir), OLD_SHA, str(len(OLD))], check=True, timeout=120)
    blob = netdir / "filestore" / "blobs" / OLD_SHA[:2] / OLD_SHA
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(OLD)
    handle = NetworkHandle(netdir=netdir, broker="embedded", log_path=base / "network.log")
    handle.start()  # migrates the database to the blob key
    yield handle
    handle.stop()


def _client(net: NetworkHandle, party: str = "researcher") -> FileStoreClient:
    return FileStoreClient(net.credentials(party).filestore)


def _blob_files(net: NetworkHandle) -> set[str]:
    return {p.relative_to(net.netdir / "filestore" / "blobs").as_posix()
            for p in (net.netdir / "filestore" / "blobs").glob("??/*")}  # fmt: skip


def test_a_blob_stored_before_blake3_is_served_under_its_sha256(net: NetworkHandle) -> None:
    ref = BlobRef(sha256=OLD_SHA, size=len(OLD))
    with _client(net) as researcher, _client(net, "node-a") as node_a, _client(net, "node-b") as node_b:
        assert researcher.download_bytes(ref) == OLD and node_a.download_bytes(ref) == OLD
        with pytest.raises(BlobTransferError, match="404"):
            node_b.download_bytes(ref)  # its readers came through the migration too
        assert researcher.release(ref) is False and node_a.download_bytes(ref) == OLD  # node-a still holds it
        assert node_a.release(ref) is True and not (net.netdir / "filestore" / "blobs" / OLD_SHA[:2] / OLD_SHA).exists()
    columns = [row[1] for row in sqlite3.connect(net.netdir / "filestore" / "db.sqlite3").execute(
        "PRAGMA table_info(filestore_blob)")]  # fmt: skip
    assert "key" in columns and "sha256" not in columns


@pytest.mark.parametrize("size", [1000, 3 << 20])  # PUT to its key; POST, named by the store
def test_new_blobs_are_named_by_blake3_and_kept_under_that_key(net: NetworkHandle, size: int) -> None:
    data = os.urandom(size)
    hexdigest = blake3.blake3(data).hexdigest()
    with _client(net) as researcher, _client(net, "node-a") as node_a:
        ref = researcher.upload_bytes(data, readers=["node-a"])
        assert ref == BlobRef(blake3=hexdigest, size=size) and ref.key == f"blake3-{hexdigest}"
        assert f"{hexdigest[:2]}/blake3-{hexdigest}" in _blob_files(net)
        assert node_a.download_bytes(ref) == data
        by_sha = researcher.upload_bytes(data, digest="sha256")  # the same bytes by sha256: another name
        assert by_sha.key == hashlib.sha256(data).hexdigest() and researcher.download_bytes(by_sha) == data
        assert researcher.exists(ref.key) and researcher.exists(by_sha.key)


def test_a_ref_whose_digest_names_other_bytes_is_refused_on_download(net: NetworkHandle) -> None:
    data = os.urandom(5000)
    with _client(net) as researcher:
        ref = researcher.upload_bytes(data)
        swapped = BlobRef(sha256=ref.blake3, size=ref.size)  # the BLAKE3's hex passed off as a sha256
        with pytest.raises(BlobTransferError, match="404"):
            researcher.download_bytes(swapped)  # no blob has that name


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("PUT", "blake3-" + "0" * 64, b"not what the key names", "blake3 mismatch"),
        ("PUT", OLD_SHA, b"not what the key names", "sha256 mismatch"),
        ("PUT", "blake3-" + "A" * 64, b"x", "is not a blob key"),
        ("PUT", "blake2b-" + "0" * 64, b"x", "is not a blob key"),
        ("PUT", "blake3-" + "0" * 63, b"x", "is not a blob key"),
        ("GET", "blake3-" + "0" * 65, b"", "is not a blob key"),
        ("GET", "blake3-" + "0" * 64, b"", "no blob blake3-"),
        ("POST", "?digest=md5", b"some bytes", "unknown digest 'md5'"),
        ("POST", "?digest=" + "x" * 5000, b"some bytes", "unknown digest"),
    ],
)
def test_keys_and_digests_that_are_not_blake3_or_sha256_are_refused(net: NetworkHandle, method: str, path: str,
                                                                     body: bytes, error: str) -> None:  # fmt: skip
    before = _blob_files(net)
    url = f"{net.filestore_url}/api/v1/blobs" + (path if path.startswith("?") else f"/{path}")
    creds = net.credentials("researcher").filestore
    with http_session(creds) as session:
        response = session.request(method, url, data=body or None, timeout=30,
                                   headers={"Authorization": f"Token {creds.token}"})  # fmt: skip
    assert response.status_code in (400, 404) and error in response.json()["error"], response.text
    assert _blob_files(net) == before  # nothing kept
