"""The node's durable task queue on its real SQLite files: what a killed daemon had queued is there on restart,
without an fsync per commit (WAL with synchronous=NORMAL), and a request id is queued once."""

from __future__ import annotations

import os
import signal
import threading

from fedsilo.node.tasks import TaskQueue

ITEM = {"request": "{}", "reply_to": "researcher", "signature": ""}


def test_commits_do_not_wait_for_the_disk(tmp_path) -> None:
    q = TaskQueue(tmp_path / "q")
    try:
        assert q._seen.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert q._q._putter.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert q._q._putter.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        q.close()


def test_what_a_killed_daemon_queued_and_answered_is_there_after_a_restart(tmp_path) -> None:
    pid = os.fork()
    if pid == 0:  # the daemon: queues two tasks, answers one, and is killed without closing anything
        q = TaskQueue(tmp_path / "q")
        q.put("a", ITEM)
        q.put("b", ITEM)
        q.done(q.get(threading.Event()), b"reply-a")
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    q = TaskQueue(tmp_path / "q")
    try:
        assert q.seen("a") == "done" and q.reply("a") == b"reply-a"
        assert q.seen("b") == "queued" and q.size == 1
        assert q.get(threading.Event())["data"]["request_id"] == "b"
        assert not q.put("a", ITEM) and not q.put("b", ITEM)  # a redelivered copy is not queued again
    finally:
        q.close()
