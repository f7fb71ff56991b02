"""The file store's view threads: a few long-lived threads, each keeping its SQLite connection.

Django's `ASGIHandler` runs every request in `ThreadSensitiveContext()`, which starts a new
single-thread executor per request and shuts it down at the end: each request started a thread and
opened a new SQLite connection (settings.py keeps connections "per thread", and the threads died).
Measured (2026-11-30, quiet machine): `connect` ran 117 times in 118 requests, 0.1-0.25 s of server wait
per request under load. Here `WORKER_THREADS` threads live as long as the store; a request is bound to
one of them when it first needs a thread (after its body has arrived: a slow client holds no thread),
the one with the fewest calls waiting, and keeps it to its end (Django's thread-sensitive contract: a
request's signals, view and response close run on one thread, with one connection).

Measured (bench/filestore_requests.py, 200 KB blob, HTTPS, 60 requests per client; 2026-11-30 20:01-20:03, load
2.5-2.8 falling, other processes 0-10 % of the CPU; the store of 632048f and this one alternated twice; this one
also reads without a write, access.TOUCH_EVERY_S), median ms / requests per second:
HEAD 1 client 4.4-4.5 -> 2.9-3.1 ms, 10 clients 198-221 -> 352-382 req/s; GET 1 client 5.1-7.8 -> 3.7-4.1 ms,
10 clients 166-186 -> 260-272 req/s; PUT 1 client 9.8-11.0 -> 8.4 ms, 10 clients 97-100 -> 121-128 req/s
(PUTs wait on SQLite's single writer and the file writes, not on threads).

    workers = WorkerThreads(4)
    async with ThreadSensitiveContext(executor=workers.for_request()):
        await handler(scope, receive, send)
    workers.close()        # on shutdown: each thread closes its connection (SQLite checkpoints its WAL)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any

log = logging.getLogger("fedsilo.network.filestore")

WORKER_THREADS = 4
"""Threads that run views. SQLite takes one writer at a time, so more would only wait on its lock; fewer
than 4 would let one view waiting on that lock (up to its 20 s timeout) stall the requests queued behind it."""


class WorkerThreads:
    """`count` single-thread executors shared by all requests; `for_request()` gives a request its own
    sticky view of them (an `Executor` for `ThreadSensitiveContext(executor=...)`).

        workers = WorkerThreads(4)
        executor = workers.for_request()   # picks a thread on its first submit, keeps it
    """

    def __init__(self, count: int = WORKER_THREADS) -> None:
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"filestore-worker-{i}") for i in range(count)]
        self._waiting = [0] * count  # calls submitted and not finished, per thread
        self._lock = threading.Lock()  # _waiting is raised on the loop, lowered on the workers
        self.opened = 0  # database connections opened (`connection_opened`)

    @property
    def count(self) -> int:
        return len(self._threads)

    def for_request(self) -> Executor:
        return _RequestExecutor(self)

    def _pick(self) -> int:
        with self._lock:  # the least busy; ties to the lowest index, so a quiet store uses one warm thread
            return min(range(len(self._threads)), key=self._waiting.__getitem__)

    def _submit(self, index: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            self._waiting[index] += 1
        future = self._threads[index].submit(fn, *args, **kwargs)
        future.add_done_callback(lambda _: self._done(index))
        return future

    def _done(self, index: int) -> None:
        with self._lock:
            self._waiting[index] -= 1

    def connection_opened(self, **_: Any) -> None:
        """Django's `connection_created` receiver: one line per connection, so the log shows at most one per thread."""
        with self._lock:
            self.opened += 1
            opened = self.opened
        log.info("database connection %d opened in thread %s", opened, threading.current_thread().name)

    def close(self, timeout: float = 5.0) -> int:
        """Close each thread's database connection (on its own thread), then stop the threads; returns how
        many closed in time. A thread still busy after `timeout` (a view waiting on SQLite's lock) is left."""
        from django.db import connections

        # One thread after another: SQLite removes the WAL when the last connection closes and takes the
        # database's exclusive lock; connections closing at the same moment each find another still open, and the
        # WAL stays behind. Measured with sqlite3 alone (4 connections, each wrote, 300 trials, 2026-12-01): 17
        # WALs left when closed at once from 4 threads, none when closed in turn. In the suite,
        # tests/integration/test_filestore_requests.py's last test failed this way in 2 of about 12 full runs.
        closed, deadline = 0, time.monotonic() + timeout
        for thread in self._threads:
            done, _ = wait([thread.submit(connections.close_all)], timeout=max(0.0, deadline - time.monotonic()))
            closed += len(done)
        for thread in self._threads:
            thread.shutdown(wait=False)
        return closed


class _RequestExecutor(Executor):
    """One request's executor: the first call picks a thread of `WorkerThreads`; later calls go to it."""

    def __init__(self, workers: WorkerThreads) -> None:
        self._workers = workers
        self._index: int | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._index is None:
            self._index = self._workers._pick()
        return self._workers._submit(self._index, fn, *args, **kwargs)
