"""The node's durable task queue (persist-queue SQLiteAckQueue) with de-duplication by request id.

A task is acked only after its reply has been published, so a daemon that stops mid-task runs it again
on restart (`auto_resume`). QoS 1 may deliver a request twice, and researchers re-send requests they have
no answer for: the `seen` table queues each request id once and keeps its reply, which a re-sent copy gets
again (a broker restart may have lost the first).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import persistqueue.serializers.json as json_serializer
from persistqueue import SQLiteAckQueue
from persistqueue.exceptions import Empty
from persistqueue.sqlackqueue import AckStatus

log = logging.getLogger("fedsilo.node.tasks")

SEEN_RETENTION_S = 14 * 24 * 3600
FULL_REPLIES_KEPT = 32
"""Replies kept with their inline blobs (for re-sent copies of the latest tasks): at most 32 x 700 KB."""
PARSED_KEPT = 4
"""Queued requests kept parsed in memory for the runner (`TaskQueue.take_parsed`): parsing a 270 KB request
again took 0.9 ms (2026-12-01)."""
PAYLOAD = "payload"
"""The table (in seen.db) that holds each queued request's bytes, apart from the queue's row: SQLite rewrites a
whole row when one column changes, and persist-queue changes the row's status twice a task (taken, acked), so a
200 KB request in the row was written three times and read once a round. Measured (put + get + done, 300 in a
row, two runs each alternated, 2026-12-01): with the runner's parsed copy (the daemon's case) 1.58-1.68 ms of CPU
a task with a 200 KB request in the row, 1.16-1.19 ms with it apart; read back (after a restart) 1.98-2.53 ->
1.30-1.40 ms."""
PAYLOAD_APART_BYTES = 16 << 10
"""Requests up to this stay in the queue's row (a large model's request, its blobs in the store: about 2 KB):
apart they cost two more commits, 0.53 -> 0.83 ms a task for a 2 KB request."""
ACKED_KEPT = 0
"""Answered items kept in the queue: none. Each holds its request, with its inline blobs (a 200 KB model: the
queue grew by 270 KB a round until the daemon stopped); the `seen` table answers re-sent copies."""


PAGE_BYTES = 64 << 10
"""SQLite page size of a new queue's databases (an existing one keeps its own). A queued request carries its
inline blobs (a 200 KB model is 270 KB of base64), and SQLite writes a row that size as a chain of overflow
pages, each a WAL frame of two `pwrite` calls: 4 KiB pages made 420 frames a round (a node's daemon, `strace`).
Measured (2026-12-01, put + get + done of a 270 KB request and its 270 KB reply, 50 in a row): 5.5 ms a round
with 4 KiB pages, 3.7 ms with 64 KiB."""
CHECKPOINT_PAGES = 64
"""WAL pages before SQLite copies them back (its default is 1,000 pages: 64 MiB with these pages)."""


def _open_sqlite(path: str, **kwargs: Any) -> sqlite3.Connection:
    """A connection in WAL mode; a new file gets `PAGE_BYTES` pages (the page size must be set before WAL is)."""
    conn = sqlite3.connect(path, **kwargs)
    conn.execute(f"PRAGMA page_size={PAGE_BYTES}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
    # Commits are written without waiting for the disk: durable against the daemon's own crash or kill (the page
    # cache holds them), which is what the queue is for; after a power cut the last few may be lost, and the
    # researcher re-sends what it has no answer for. Measured (2026-11-30, this VM's disk while other test suites
    # wrote to it): put + get + ack with a seen record 52-63 ms with an fsync per commit (5 a round), 3 ms on an
    # idle disk.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class _TaskSerializer:
    """A queued item as bytes: `MAGIC`, its fields other than `request` as one JSON line, then the request as it
    is: the message's wire form (`Message.to_wire`: its JSON, then its inline blobs' raw bytes) or, from an
    older daemon, its JSON. persist-queue's JSON serializer escaped the request into a JSON string and parsed it
    back (0.6 ms a 270 KB request, 2026-12-01), with the blobs in base64 (a third more bytes to write). Items an
    older fedsilo queued as plain JSON are read as they were written."""

    MAGIC = b"fedsilo-task/1\n"

    @classmethod
    def dumps(cls, item: Any) -> bytes:
        request = item.get("request") if isinstance(item, dict) else None
        if not isinstance(request, str | bytes):
            return json_serializer.dumps(item)
        if "request_is_bytes" in item:  # the format's own key; a queued item's keys are the daemon's, never a party's
            raise ValueError("'request_is_bytes' is reserved in a queued item")
        head = {k: v for k, v in item.items() if k != "request"} | {"request_is_bytes": isinstance(request, bytes)}
        body = request if isinstance(request, bytes) else request.encode("utf-8")
        return cls.MAGIC + json.dumps(head).encode() + b"\n" + body  # json.dumps escapes any newline in the head

    @classmethod
    def loads(cls, data: bytes) -> Any:
        if not data.startswith(cls.MAGIC):
            return json_serializer.loads(data)
        head, _, request = data[len(cls.MAGIC) :].partition(b"\n")
        item = json.loads(head)
        item["request"] = request if item.pop("request_is_bytes", False) else request.decode("utf-8")
        return item


class _AckQueue(SQLiteAckQueue):
    """persist-queue's queue on `_open_sqlite`'s connections (persist-queue's own opens them with 4 KiB pages and
    waits for the disk at each commit)."""

    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> sqlite3.Connection:
        return _open_sqlite(f"{path}/{self.db_file_name}", timeout=timeout, check_same_thread=not multithreading)


class TaskQueue:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._q = _AckQueue(
            str(path), auto_resume=True, multithreading=True, serializer=_TaskSerializer, name="train"
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._parsed: dict[str, Any] = {}
        self._seen = _open_sqlite(str(path / "seen.db"), check_same_thread=False, isolation_level=None)
        self._seen.execute(
            "CREATE TABLE IF NOT EXISTS seen (request_id TEXT PRIMARY KEY, at REAL NOT NULL, state TEXT NOT NULL)"
        )
        columns = {row[1] for row in self._seen.execute("PRAGMA table_info(seen)")}
        if "reply" not in columns:  # queues made before replies were kept
            self._seen.execute("ALTER TABLE seen ADD COLUMN reply BLOB")
        if "full_reply" not in columns:  # queues made before inline blobs
            self._seen.execute("ALTER TABLE seen ADD COLUMN full_reply BLOB")
        self._seen.execute("CREATE TABLE IF NOT EXISTS payload (request_id TEXT PRIMARY KEY, data BLOB NOT NULL)")
        self._seen.execute("DELETE FROM seen WHERE at < ?", (time.time() - SEEN_RETENTION_S,))
        # a request whose item never got queued (stopped in between) or was answered (stopped before the payload
        # went): nothing will read it
        queued = [row["data"].get("request_id") for row in self._q.queue()
                  if isinstance(row["data"], dict) and str(row["status"]) != AckStatus.acked]  # fmt: skip
        self._seen.execute("CREATE TEMP TABLE IF NOT EXISTS queued_ids (request_id TEXT)")
        self._seen.executemany("INSERT INTO queued_ids VALUES (?)", [(rid,) for rid in queued])
        self._seen.execute("DELETE FROM payload WHERE request_id NOT IN (SELECT request_id FROM queued_ids)")
        self._seen.execute("DROP TABLE queued_ids")
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

    def put(self, request_id: str, item: dict[str, Any], parsed: Any = None) -> bool:
        """Queue a task; False when this request id was already accepted. `parsed`: the request as the daemon
        parsed it, which `take_parsed` hands the runner instead of parsing the queued copy again (kept in memory
        for `PARSED_KEPT` tasks at most: a flood of queued requests is held on disk, not in memory)."""
        if self.seen(request_id) is not None:
            return False
        request = item.get("request")
        if isinstance(request, str | bytes) and len(request) > PAYLOAD_APART_BYTES:  # beside the queue (PAYLOAD)
            data = request.encode("utf-8") if isinstance(request, str) else request
            with self._lock:
                self._seen.execute("INSERT OR REPLACE INTO payload VALUES (?, ?)", (request_id, data))
            item = {k: v for k, v in item.items() if k != "request"} | {"payload": isinstance(request, bytes)}
        # Payload, then queue, then remember: a crash in between re-queues on redelivery, it never loses a task.
        self._q.put({"request_id": request_id, **item})
        with self._lock:
            self._seen.execute(
                "INSERT OR IGNORE INTO seen (request_id, at, state) VALUES (?, ?, 'queued')", (request_id, time.time())
            )
        if parsed is not None:
            with self._lock:
                if len(self._parsed) < PARSED_KEPT:
                    self._parsed[request_id] = parsed
        self._wake.set()
        return True

    def take_parsed(self, request_id: str) -> Any:
        """The request `put` was given parsed (then forgotten here), or None: parse the queued copy."""
        with self._lock:
            return self._parsed.pop(request_id, None)

    def get(self, stop: threading.Event) -> dict[str, Any] | None:
        """Block until a task is ready (or `stop` is set, then None). Returns the raw item with `pqid`."""
        while not stop.is_set():
            self._wake.clear()
            try:
                item = self._q.get(block=False, raw=True)
            except Empty:
                self._wake.wait()
                continue
            if self._with_request(item):
                return item
        return None

    def _with_request(self, item: dict[str, Any]) -> bool:
        """The item's request read back from `payload` unless the runner will take it parsed (or the item holds it,
        as an older fedsilo queued it). False for an item whose request is gone (never so, unless the database was
        changed by hand): it leaves the queue and its request id is forgotten, so a re-sent copy is queued again."""
        data = item["data"]
        if "payload" not in data or "request" in data:
            return True
        rid = data["request_id"]
        with self._lock:
            if rid in self._parsed:
                return True
            row = self._seen.execute("SELECT data FROM payload WHERE request_id = ?", (rid,)).fetchone()
        if row is not None:
            data["request"] = bytes(row[0]) if data["payload"] else bytes(row[0]).decode("utf-8")
            return True
        log.error("[%s] queued request lost its payload; dropped from the queue (a re-sent copy is queued again)", rid)
        self._q.ack(id=item["pqid"])
        self._q.clear_acked_data(keep_latest=ACKED_KEPT)
        with self._lock:
            self._seen.execute("DELETE FROM seen WHERE request_id = ? AND state = 'queued'", (rid,))
        return False

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
        if "payload" in item["data"]:  # after the ack: a stop in between leaves a payload no one reads (next open)
            with self._lock:
                self._seen.execute("DELETE FROM payload WHERE request_id = ?", (item["data"]["request_id"],))

    @property
    def size(self) -> int:
        return self._q.size

    def close(self) -> None:
        self._q.clear_acked_data(keep_latest=ACKED_KEPT)
        with self._lock:
            self._seen.close()
