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
        st.text(max_size=20).filter(lambda k: k not in ("request", "request_is_bytes")),
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


def test_the_serializer_s_own_key_is_refused_in_an_item() -> None:
    import pytest

    from fedsilo.node.tasks import _TaskSerializer

    with pytest.raises(ValueError, match="reserved"):  # it would come back as the format's flag, not as given
        _TaskSerializer.dumps({"request_is_bytes": None, "request": ""})


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
        stored = q._seen.execute("SELECT length(data) FROM payload WHERE request_id = 'a'").fetchone()[0]
        assert stored == len(request.to_wire()) < len(request.model_dump_json())  # raw bytes, not base64 in JSON
    finally:
        q.close()


# ------------------------------------------------------------------ a large request's bytes apart from its row
def _row_bytes(q: TaskQueue) -> list[int]:
    return [n for (n,) in q._q._getter.execute(f"SELECT length(data) FROM {q._q._table_name}")]


def test_a_large_request_is_kept_apart_from_the_queue_row_and_a_small_one_in_it(tmp_path) -> None:
    """SQLite rewrites a whole row when persist-queue changes its status (taken, acked): a 200 KB request in the row
    was written three times a task. Apart, it is written once and read back only when the runner has no parsed copy."""
    from fedsilo.node.tasks import PAYLOAD_APART_BYTES

    big, small = os.urandom(200_000), b"x" * 2_000
    q = TaskQueue(tmp_path / "q")
    try:
        q.put("big", {**ITEM, "request": big}, parsed="parsed-big")
        q.put("small", {**ITEM, "request": small})
        q.put("text", {**ITEM, "request": "t" * (PAYLOAD_APART_BYTES + 1)})
        assert max(_row_bytes(q)) < 4_000  # the small request's row holds it; the big one's does not
        payloads = dict(q._seen.execute("SELECT request_id, length(data) FROM payload"))
        assert payloads == {"big": 200_000, "text": PAYLOAD_APART_BYTES + 1}
        first = q.get(threading.Event())
        assert "request" not in first["data"] and q.take_parsed("big") == "parsed-big"  # not read back: parsed
        assert q.get(threading.Event())["data"]["request"] == small
        text = q.get(threading.Event())
        assert text["data"]["request"] == "t" * (PAYLOAD_APART_BYTES + 1)  # no parsed copy: read back, as a str
        for item in (first, text):
            q.done(item, b"reply")
        assert q._seen.execute("SELECT count(*) FROM payload").fetchone()[0] == 0
    finally:
        q.close()


def test_a_large_request_queued_by_a_killed_daemon_comes_back_whole(tmp_path) -> None:
    big = os.urandom(300_000)
    pid = os.fork()
    if pid == 0:  # queues two, answers one, killed without closing anything
        q = TaskQueue(tmp_path / "q")
        q.put("a", {**ITEM, "request": os.urandom(100_000)}, parsed="in memory, lost with the process")
        q.put("b", {**ITEM, "request": big}, parsed="in memory, lost with the process")
        q.done(q.get(threading.Event()), b"reply-a")
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    q = TaskQueue(tmp_path / "q")
    try:
        item = q.get(threading.Event())
        assert item["data"]["request_id"] == "b" and item["data"]["request"] == big  # read back from its payload
        assert q.seen("a") == "done" and q.reply("a") == b"reply-a"
        assert [r for (r,) in q._seen.execute("SELECT request_id FROM payload")] == ["b"]
    finally:
        q.close()


def test_payloads_no_queued_item_reads_are_removed_at_open(tmp_path) -> None:
    """A daemon stopped between storing a payload and queueing its item, or between the ack and the payload's
    removal, leaves a payload no one reads: the next open removes it, and keeps those of queued items."""
    q = TaskQueue(tmp_path / "q")
    q.put("kept", {**ITEM, "request": os.urandom(50_000)})
    q._seen.execute("INSERT INTO payload VALUES ('orphan', ?)", (b"x" * 50_000,))
    q.close()
    q = TaskQueue(tmp_path / "q")
    try:
        assert [r for (r,) in q._seen.execute("SELECT request_id FROM payload")] == ["kept"]
        assert len(q.get(threading.Event())["data"]["request"]) == 50_000
    finally:
        q.close()


def test_an_item_whose_payload_is_gone_leaves_the_queue_and_a_resent_copy_is_queued(tmp_path, caplog) -> None:
    q = TaskQueue(tmp_path / "q")
    try:
        q.put("lost", {**ITEM, "request": os.urandom(50_000)})
        q.put("next", {**ITEM, "request": b"{}"})
        q._seen.execute("DELETE FROM payload WHERE request_id = 'lost'")  # by hand: never otherwise
        assert q.get(threading.Event())["data"]["request_id"] == "next"
        assert "lost its payload" in caplog.text and q.seen("lost") is None
        assert q.put("lost", {**ITEM, "request": os.urandom(50_000)})  # the researcher's re-sent copy
    finally:
        q.close()
