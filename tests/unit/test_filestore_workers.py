"""The file store's view threads at shutdown (`network/filestore/workers.py`): each closes its database connection
in turn, never two at once. SQLite removes the WAL only when the last connection closes and takes the database's
exclusive lock; closed at the same moment from several threads, each connection found another still open and the
WAL stayed (17 of 300 trials with sqlite3 alone, 0 of 300 closed in turn). The whole store's shutdown, WAL gone:
tests/integration/test_filestore_requests.py."""

from __future__ import annotations

import itertools
import threading
import time

import django.db

from fedsilo.network.filestore.workers import WorkerThreads


def test_the_threads_close_their_connections_one_after_another(monkeypatch) -> None:
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def close_all() -> None:  # a connection's close, as slow as a WAL checkpoint on a busy disk
        start = time.monotonic()
        time.sleep(0.02)
        with lock:
            spans.append((threading.current_thread().name, start, time.monotonic()))

    monkeypatch.setattr(django.db.connections, "close_all", close_all)
    workers = WorkerThreads(4)
    assert workers.close(timeout=5.0) == 4
    assert len({name for name, _, _ in spans}) == 4  # each on its own thread (Django's connections are per thread)
    ordered = sorted(spans, key=lambda s: s[1])
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(ordered))  # no two at once


def test_a_thread_still_busy_at_the_deadline_is_left_and_not_counted(monkeypatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(django.db.connections, "close_all", lambda: None)
    workers = WorkerThreads(2)
    workers._threads[1].submit(release.wait)  # a view waiting on SQLite's lock
    try:
        assert workers.close(timeout=0.2) == 1
    finally:
        release.set()
