"""The request ids a node accepted, with the newest timestamp of each, kept on disk across restarts.

A researcher re-sends a request it has no answer for under the same id with a fresh timestamp and a fresh
signature; a replay (the broker's, or a QoS 1 redelivery) repeats a copy's exact bytes, so its timestamp
is never newer than one already accepted. A copy is admitted only when it is newer than every copy of
that id before it; ids older than the node's freshness window are forgotten, because a copy that old is
refused as expired anyway (FS103).

    seen = SeenRequests(Path("NODEDIR/db/requests.sqlite3"), window_s=360)
    seen.replayed("r1", "abc", 1700000000.0)   # False: never seen
    seen.record("r1", "abc", 1700000000.0)
    seen.replayed("r1", "abc", 1700000000.0)   # True: the same copy again
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path


class SeenRequests:
    """(researcher, request id) -> newest accepted timestamp, in SQLite (WAL) so that it survives a restart."""

    PRUNE_EVERY = 500

    def __init__(self, path: Path, window_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.window_s = window_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a daemon crash (WAL on disk), only a power cut may lose the last ones;
        # measured 0.16 ms a check and record against 6.5 ms with FULL (this 2-core machine, loaded, 2026-11-30).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS seen (researcher TEXT NOT NULL, request_id TEXT NOT NULL, "
            "timestamp REAL NOT NULL, PRIMARY KEY (researcher, request_id))"
        )
        self._records = 0
        self.prune()

    def replayed(self, researcher: str, request_id: str, timestamp: float) -> bool:
        """True when a copy of this request with this timestamp or a newer one was accepted before."""
        with self._lock:
            row = self._db.execute(
                "SELECT timestamp FROM seen WHERE researcher = ? AND request_id = ?", (researcher, request_id)
            ).fetchone()
        return row is not None and timestamp <= row[0]

    def record(self, researcher: str, request_id: str, timestamp: float) -> None:
        """Remember an accepted copy (written before the request is handled: a crash cannot forget it)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO seen (researcher, request_id, timestamp) VALUES (?, ?, ?) ON CONFLICT (researcher, "
                "request_id) DO UPDATE SET timestamp = max(timestamp, excluded.timestamp)",
                (researcher, request_id, timestamp),
            )
            self._records += 1
            due = self._records % self.PRUNE_EVERY == 0
        if due:
            self.prune()

    def prune(self) -> None:
        """Forget what the freshness window refuses anyway (with a minute of margin)."""
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE timestamp < ?", (time.time() - self.window_s - 60,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
