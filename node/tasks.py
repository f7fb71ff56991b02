"""The node's durable task queue (persist-queue SQLiteAckQueue) with de-duplication by request id.

A task is acked only after its reply has been published, so a daemon that stops mid-task runs it again
on restart (`auto_resume`). QoS 1 may deliver a request twice, and researchers re-send requests they have
no answer for: the `seen` table queues each request id once and keeps its reply, which a re-sent copy gets
again (a broker restart may have lost the first).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import persistqueue.serializers.json as json_serializer
from persistqueue import SQLiteAckQueue
from persistqueue.exceptions import Empty

SEEN_RETENTION_S = 14 * 24 * 3600
FULL_REPLIES_KEPT = 32
"""Replies kept with their inline blobs (for re-sent copies of the latest tasks): at most 32 x 700 KB."""
ACKED_KEPT = 0
"""Answered items kept in the queue: none. Each holds its request, with its inline blobs (a 200 KB model: the
queue grew by 270 KB a round until the daemon stopped); the `seen` table answers re-sent copies."""


class _AckQueue(SQLiteAckQueue):
    """persist-queue's queue, its WAL commits written without waiting for the disk (`synchronous=NORMAL`).

    A commit is then durable against the daemon's own crash or kill (the page cache holds it), which is what the
    queue is for; after a power cut the last few may be lost, and the researcher re-sends what it has no answer
    for. Measured (2026-11-30, this VM's disk while other test suites wrote to it): put + get + ack with a seen
    record 52-63 ms with an fsync per commit (5 a round), 3 ms on an idle disk."""

    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> sqlite3.Connection:
        conn = super()._new_db_connection(path, multithreading, timeout)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn


class TaskQueue:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._q = _AckQueue(
            str(path), auto_resume=True, multithreading=True, serializer=json_serializer, name="train"
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._seen = sqlite3.connect(str(path / "seen.db"), check_same_thread=False, isolation_level=None)
        self._seen.execute("PRAGMA journal_mode=WAL")
        self._seen.execute("PRAGMA synchronous=NORMAL")  # as the queue's (_AckQueue)
        self._seen.execute(
            "CREATE TABLE IF NOT EXISTS seen (request_id TEXT PRIMARY KEY, at REAL NOT NULL, state TEXT NOT NULL)"
        )
        columns = {row[1] for row in self._seen.execute("PRAGMA table_info(seen)")}
        if "reply" not in columns:  # queues made before replies were kept
            self._seen.execute("ALTER TABLE seen ADD COLUMN reply BLOB")
        if "full_reply" not in columns:  # queues made before inline blobs
            self._seen.execute("ALTER TABLE seen ADD COLUMN full_reply BLOB")
        self._seen.execute("DELETE FROM seen WHERE at < ?", (time.time() - SEEN_RETENTION_S,))
        if self._q.size:
            self._wake.set()

    def seen(self, request_id: str) -> str | None:
        """`queued`, `done`, or None for a request never accepted."""
        with self._lock:
            row = self._seen.execute("SELECT state FROM seen WHERE request_id = ?", (request_id,)).fetchone()
        return row[0] if row else None

    def reply(self, request_id: str) -> bytes | None:
        """The reply published for a finished request, if kept."""
        with self._lock:
            row = self._seen.execute(
                "SELECT coalesce(full_reply, reply) FROM seen WHERE request_id = ?", (request_id,)
            ).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def put(self, request_id: str, item: dict[str, Any]) -> bool:
        """Queue a task; False when this request id was already accepted."""
        if self.seen(request_id) is not None:
            return False
        # Queue first, then remember: a crash in between re-queues on redelivery, it never loses a task.
        self._q.put({"request_id": request_id, **item})
        with self._lock:
            self._seen.execute(
                "INSERT OR IGNORE INTO seen (request_id, at, state) VALUES (?, ?, 'queued')", (request_id, time.time())
            )
        self._wake.set()
        return True

    def get(self, stop: threading.Event) -> dict[str, Any] | None:
        """Block until a task is ready (or `stop` is set, then None). Returns the raw item with `pqid`."""
        while not stop.is_set():
            self._wake.clear()
            try:
                return self._q.get(block=False, raw=True)
            except Empty:
                self._wake.wait()
        return None

    def wake(self) -> None:
        """Unblock `get` (used when stopping)."""
        self._wake.set()

    def done(self, item: dict[str, Any], reply: bytes | None = None, lean: bytes | None = None) -> None:
        """Mark a task answered (keeping `reply` for re-sent copies) and remove it from the queue.

        `lean`: the reply without its inline blobs (`Message.to_json(inline=False)`), for a reply that carries
        some: the full one is kept for the `FULL_REPLIES_KEPT` latest tasks only (a researcher re-sends while its
        round waits), then the lean one (the data would grow the table by the update's size every round). The
        queue's answered items (the requests, with their inline blobs) are deleted here (`ACKED_KEPT`)."""
        with self._lock:
            self._seen.execute(
                "INSERT OR REPLACE INTO seen (request_id, at, state, reply, full_reply) VALUES (?, ?, 'done', ?, ?)",
                (item["data"]["request_id"], time.time(), lean if lean is not None else reply,
                 reply if lean is not None else None),
            )  # fmt: skip
            if lean is not None:
                self._seen.execute(
                    "UPDATE seen SET full_reply = NULL WHERE full_reply IS NOT NULL AND request_id NOT IN "
                    "(SELECT request_id FROM seen WHERE full_reply IS NOT NULL ORDER BY at DESC LIMIT ?)",
                    (FULL_REPLIES_KEPT,),
                )
        self._q.ack(id=item["pqid"])
        self._q.clear_acked_data(keep_latest=ACKED_KEPT)

    @property
    def size(self) -> int:
        return self._q.size

    def close(self) -> None:
        self._q.clear_acked_data(keep_latest=ACKED_KEPT)
        with self._lock:
            self._seen.close()
