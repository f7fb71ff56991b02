"""The node's durable task queue on its real SQLite files: what a killed daemon had queued is there on restart,
without an fsync per commit (WAL with synchronous=NORMAL), and a request id is queued once."""

from __future__ import annotations

import os
import signal
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------ storage of a queued request
def test_a_new_queue_uses_large_pages_and_an_existing_one_keeps_its_own(tmp_path) -> None:
    import sqlite3

    from fedsilo.node.tasks import PAGE_BYTES

    q = TaskQueue(tmp_path / "new")
    try:
        assert q._q._putter.execute("PRAGMA page_size").fetchone()[0] == PAGE_BYTES
        assert q._seen.execute("PRAGMA page_size").fetchone()[0] == PAGE_BYTES
    finally:
        q.close()
    old = tmp_path / "old"
    old.mkdir()
    for name in ("data.db", "seen.db"):  # a queue made by an older fedsilo: 4 KiB pages, already in WAL mode
        conn = sqlite3.connect(old / name)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.close()
    q = TaskQueue(old)
    try:
        assert q._q._putter.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert q.put("a", ITEM) and q.get(threading.Event())["data"]["request"] == "{}"
    finally:
        q.close()


def test_items_an_older_fedsilo_queued_as_json_are_read(tmp_path) -> None:
    import persistqueue.serializers.json as json_serializer
    from persistqueue import SQLiteAckQueue

    old = SQLiteAckQueue(str(tmp_path / "q"), multithreading=True, serializer=json_serializer, name="train")
    old.put({"request_id": "a", **ITEM, "request": '{"kind": "train_request"}\n'})
    old.close()
    q = TaskQueue(tmp_path / "q")
    try:
        item = q.get(threading.Event())
        assert item["data"] == {"request_id": "a", **ITEM, "request": '{"kind": "train_request"}\n'}
    finally:
        q.close()


@settings(max_examples=200, deadline=None)
@given(
    head=st.dictionaries(
        st.text(max_size=20).filter(lambda k: k != "request"),
        st.one_of(st.text(), st.integers(), st.none(), st.booleans()),
        max_size=5,
    ),
    request=st.one_of(st.text(), st.binary()),
)
def test_the_task_serializer_gives_back_what_it_was_given(head, request) -> None:
    from fedsilo.node.tasks import _TaskSerializer

    item = {**head, "request": request}  # newlines, NUL, the magic itself, any unicode or bytes in either part
    assert _TaskSerializer.loads(_TaskSerializer.dumps(item)) == item
    assert _TaskSerializer.loads(_TaskSerializer.dumps(head)) == head  # no request: plain JSON


def test_the_runner_gets_the_parsed_request_once_and_a_flood_of_requests_is_not_held_in_memory(tmp_path) -> None:
    from fedsilo.node.tasks import PARSED_KEPT

    q = TaskQueue(tmp_path / "q")
    try:
        parsed = [object() for _ in range(PARSED_KEPT + 3)]
        for i, p in enumerate(parsed):
            assert q.put(f"r{i}", ITEM, parsed=p)
        assert not q.put("r0", ITEM, parsed=object())  # a redelivered copy replaces nothing
        assert len(q._parsed) == PARSED_KEPT
        assert q.take_parsed("r0") is parsed[0] and q.take_parsed("r0") is None  # handed over once
        assert q.take_parsed(f"r{PARSED_KEPT + 1}") is None  # past the bound: the runner parses the queued copy
        assert q.get(threading.Event())["data"]["request"] == "{}"
    finally:
        q.close()


def test_a_request_queued_in_its_wire_form_comes_back_with_its_blob(tmp_path) -> None:
    """The daemon queues what it received (`Message.to_wire`: JSON, NUL, the inline blob's raw bytes)."""
    from fedsilo.network.message_base import BlobRef
    from fedsilo.network.messages import TrainRequest, parse_task

    data = os.urandom(300_000) + b"\n\0"  # the separators the serializer and the wire form use, in the blob too
    request = TrainRequest(sender="r", job_id="j", round=0, dataset_id="d", plan=BlobRef(sha256="a" * 64, size=10),
                           plan_name="P", blobs={"params": BlobRef.inline(data)})  # fmt: skip
    q = TaskQueue(tmp_path / "q")
    try:
        assert q.put("a", {**ITEM, "request": request.to_wire()})
        got = q.get(threading.Event())["data"]["request"]
        assert got == request.to_wire() and parse_task(got).blobs["params"].data == data
        assert parse_task(request.model_dump_json()) == parse_task(got)  # a JSON one, queued before, reads the same
        stored = q._q._getter.execute(f"SELECT length(data) FROM {q._q._table_name}").fetchone()[0]
        assert stored < len(request.model_dump_json())  # raw bytes: not the base64 a JSON string held
    finally:
        q.close()
