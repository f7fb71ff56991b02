"""The file store's request path (issue 11): views on a few long-lived threads, each with one SQLite
connection, against many clients at once and clients that cut their uploads off; closed on stop."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsilo.common.config import Timeouts
from fedsilo.network.filestore.workers import WORKER_THREADS
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.pki import client_context
from tests.integration.test_filestore_hostile import LIVENESS_S, Tricklers, _backdate
from tests.support.procs import NetworkHandle, start_network

CLIENTS = 10
OPENED = re.compile(r"database connection \d+ opened in thread (\S+)")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHandle]:
    handle = start_network(tmp_path_factory.mktemp("fs-requests"), broker="embedded", max_upload_mb=8)
    yield handle
    handle.stop()


def _store_log(net: NetworkHandle) -> str:
    return (net.netdir / "filestore" / "filestore.log").read_text(encoding="utf-8", errors="replace")


def _threads_that_connected(net: NetworkHandle) -> list[str]:
    return OPENED.findall(_store_log(net))


def _client_session(net: NetworkHandle, rounds: int, timeouts: Timeouts | None = None) -> int:
    """One client: PUT, HEAD and GET of its own 200 KB blobs, `rounds` times; returns the requests made."""
    with FileStoreClient(net.credentials("researcher").filestore, timeouts) as client:
        for _ in range(rounds):
            data = os.urandom(200_000)
            ref = client.upload_bytes(data)
            assert client.exists(ref.key)
            assert client.download_bytes(ref) == data
    return 3 * rounds


def test_many_requests_share_a_few_threads_each_with_one_connection(net: NetworkHandle) -> None:
    with ThreadPoolExecutor(CLIENTS) as pool:
        served = sum(pool.map(lambda _: _client_session(net, 5), range(CLIENTS)))
    assert served == 150
    threads = _threads_that_connected(net)
    # Before: a thread and a connection per request (150 here). Now: at most one per worker thread.
    assert 1 <= len(threads) <= WORKER_THREADS
    assert len(set(threads)) == len(threads)
    assert all(t.startswith("filestore-worker-") for t in threads)


def _cut_off_upload(net: NetworkHandle, sent: int, length: int) -> None:
    """An authenticated PUT that announces `length` bytes, sends `sent`, and closes its connection."""
    host, port = net.filestore_url.rsplit("//", 1)[1].rsplit(":", 1)
    token = net.credentials("researcher").filestore.token
    sha = "ab" * 32
    with socket.create_connection((host, int(port))) as raw:
        tls = client_context(net.credentials("researcher").filestore.tls).wrap_socket(raw, server_hostname=host)
        tls.sendall(f"PUT /api/v1/blobs/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\n"
                    f"Content-Length: {length}\r\n\r\n".encode() + os.urandom(sent))  # fmt: skip
        tls.close()


def test_cut_off_uploads_among_busy_clients_leave_nothing_and_hold_no_thread(net: NetworkHandle) -> None:
    cuts = [(0, 1 << 20), (100_000, 1 << 20), (5 << 20, 6 << 20), ((1 << 20) - 1, 1 << 20)] * 3
    with ThreadPoolExecutor(CLIENTS) as pool:
        honest = [pool.submit(_client_session, net, 3) for _ in range(CLIENTS // 2)]
        list(pool.map(lambda cut: _cut_off_upload(net, *cut), cuts))
        assert sum(f.result() for f in honest) == 3 * 3 * (CLIENTS // 2)
    # every honest client was served after the cut-off ones, by the same threads and connections
    assert _client_session(net, 1) == 3
    assert len(_threads_that_connected(net)) <= WORKER_THREADS
    spool = net.netdir / "filestore" / "tmp"
    assert not [p.name for p in spool.iterdir() if p.name.startswith("put.")]  # the cut bodies' spools removed


def test_slow_clients_beyond_the_thread_count_hold_no_thread(net: NetworkHandle) -> None:
    """Twice as many trickling uploads (PUT and POST) and unread downloads as there are worker threads: every
    other client is still served, each call within `LIVENESS_S` (a call timeout, as in the hostile tests)."""
    with FileStoreClient(net.credentials("researcher").filestore) as researcher:
        big = researcher.upload_bytes(os.urandom(6 << 20))
    host, port = net.filestore_url.rsplit("//", 1)[1].rsplit(":", 1)
    token = net.credentials("researcher").filestore.token
    slow = Tricklers((host, int(port)), client_context(net.credentials("researcher").filestore.tls))
    auth = f"Host: x\r\nAuthorization: Token {token}\r\n"
    try:
        for i in range(2 * WORKER_THREADS):
            slow.open(f"PUT /api/v1/blobs/{i:064x} HTTP/1.1\r\n{auth}Content-Length: {1 << 20}\r\n\r\n".encode())
            slow.open(f"POST /api/v1/blobs HTTP/1.1\r\n{auth}Content-Length: {1 << 20}\r\n\r\n".encode())
            slow.open(f"GET /api/v1/blobs/{big.key} HTTP/1.1\r\n{auth}\r\n".encode(), rcvbuf=4096)
        slow.start()
        timeouts = Timeouts(connect=LIVENESS_S, transfer=LIVENESS_S)
        with ThreadPoolExecutor(CLIENTS) as pool:
            served = sum(pool.map(lambda _: _client_session(net, 2, timeouts), range(CLIENTS)))
        assert served == 3 * 2 * CLIENTS
    finally:
        slow.stop()
    assert len(_threads_that_connected(net)) <= WORKER_THREADS


def test_reads_of_a_recently_used_blob_take_no_write_lock(net: NetworkHandle) -> None:
    """While another process holds SQLite's write lock (as `fedsilo network gc` does while it deletes), a blob
    used within `access.TOUCH_EVERY_S` (a minute) is still read: K nodes fetching one model do not queue on it."""
    data = os.urandom(200_000)
    timeouts = Timeouts(connect=LIVENESS_S, transfer=LIVENESS_S)
    with FileStoreClient(net.credentials("researcher").filestore, timeouts) as client:
        ref = client.upload_bytes(data)
        writer = sqlite3.connect(net.netdir / "filestore" / "db.sqlite3", isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # the write lock, held until the reads are done
            assert client.exists(ref.key)
            assert client.download_bytes(ref) == data
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        assert client.download_bytes(ref) == data


def _last_used(net: NetworkHandle, sha: str) -> str:
    # closed, not only committed: an open connection here would keep the WAL the last test checks
    with contextlib.closing(sqlite3.connect(net.netdir / "filestore" / "db.sqlite3")) as db:
        return db.execute("SELECT last_used_at FROM filestore_blob WHERE key = ?", (sha,)).fetchone()[0]


def test_a_read_refreshes_a_blob_last_used_long_enough_ago(net: NetworkHandle) -> None:
    with FileStoreClient(net.credentials("researcher").filestore) as client:
        ref = client.upload_bytes(os.urandom(1000))
        _backdate(net, ref.key, days=1 / 24)  # an hour: past `access.TOUCH_EVERY_S`
        before = _last_used(net, ref.key)
        client.download_bytes(ref)
    assert _last_used(net, ref.key) > before  # retention still counts reads


def test_a_stopped_store_has_closed_its_connections(net: NetworkHandle) -> None:
    """Last in this module: it stops the network. uvicorn ends the process by re-raising SIGTERM, so only the
    ASGI lifespan shutdown can close the connections; SQLite removes its WAL when the last one closes."""
    _client_session(net, 1)
    db = Path(net.netdir / "filestore" / "db.sqlite3")
    assert db.with_name("db.sqlite3-wal").exists()  # in use
    net.stop()
    assert not db.with_name("db.sqlite3-wal").exists()
    assert f"{WORKER_THREADS} of {WORKER_THREADS} worker threads closed their database connection" in _store_log(net)
