"""The round's download pool (`researcher/fetch.py`) on its own: how many threads, how many updates out of the
store before the round folds one, what `close` does with work not started or still running. The downloads are
stand-ins (`load` is the Fetcher's input: the round passes one that downloads); the real file store is in
tests/integration/test_researcher_fetch.py."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest

from fedsilo.network.messages import BlobRef, TrainReply
from fedsilo.researcher.fetch import MIN_READ_S, ClientPool, Fetched, Fetcher

WAIT = 30.0  # a bound on waits that end at once when the code works; reaching it fails the test


def reply(node: str) -> TrainReply:
    ref = BlobRef(sha256="0" * 64, size=1)
    return TrainReply(sender=node, node_id=node, in_reply_to="r", job_id="j", round=0, dataset_id="d",
                      blobs={"params": ref}, sample_size=1)  # fmt: skip


class Loads:
    """`load` for a Fetcher: each call blocks until `go` is set, and counts how many run at once."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = self.calls = 0
        self.started = threading.Semaphore(0)
        self.timeouts: list[float] = []
        self.threads: set[str] = set()

    def client(self, read_timeout: float) -> Any:
        self.timeouts.append(read_timeout)
        return _Closable()

    def __call__(self, client: Any, msg: TrainReply) -> dict[str, Any]:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        self.started.release()
        try:
            assert self.go.wait(WAIT)
            if msg.node_id.startswith("bad"):
                raise ValueError(f"{msg.node_id} is unusable")
            return {"params": {}}
        finally:
            with self.lock:
                self.running -= 1


class _Closable:
    closed = False

    def close(self) -> None:
        self.closed = True


def _fetcher(loads: Loads, out: queue.Queue[Fetched], workers: int, deadline_in: float = 600.0,
             pool: ClientPool | None = None) -> Fetcher:  # fmt: skip
    return Fetcher(loads, out.put, workers, pool or ClientPool(loads.client, 60.0), time.monotonic() + deadline_in)


def test_downloads_overlap_on_at_most_workers_threads_and_wait_for_a_free_slot() -> None:
    loads, out = Loads(), queue.Queue[Fetched]()
    with _fetcher(loads, out, workers=3) as fetcher:
        for i in range(8):
            fetcher.submit(f"n{i}", reply(f"n{i}"))
        for _ in range(3):  # three downloads run at once: none waits for another to finish
            assert loads.started.acquire(timeout=WAIT)
        assert loads.running == 3
        loads.go.set()
        got = [out.get(timeout=WAIT) for _ in range(3)]
        # three updates out of the store and none folded: the fourth download waits for a slot
        assert not loads.started.acquire(timeout=0.5) and loads.calls == 3
        for _ in range(5):
            fetcher.release()  # the round folded one
            got.append(out.get(timeout=WAIT))
        assert sorted(d.node for d in got) == [f"n{i}" for i in range(8)]
        assert all(d.error is None and d.blobs == {"params": {}} for d in got)
        assert loads.most == 3 and len(loads.threads) == 3 and len(fetcher.threads()) == 3


def test_a_failed_download_is_delivered_with_its_error_and_the_others_go_on() -> None:
    loads, out = Loads(), queue.Queue[Fetched]()
    loads.go.set()
    with _fetcher(loads, out, workers=2) as fetcher:
        for node in ("a", "bad-b", "c"):
            fetcher.submit(node, reply(node))
        got = {}
        for _ in range(3):
            done = out.get(timeout=WAIT)
            got[done.node] = done
            fetcher.release()
    assert isinstance(got["bad-b"].error, ValueError) and got["bad-b"].blobs is None
    assert got["a"].error is None and got["c"].error is None


def test_close_drops_work_not_started_and_discards_running_downloads() -> None:
    loads, out = Loads(), queue.Queue[Fetched]()
    fetcher = _fetcher(loads, out, workers=2)
    for i in range(5):
        fetcher.submit(f"n{i}", reply(f"n{i}"))
    for _ in range(2):
        assert loads.started.acquire(timeout=WAIT)
    fetcher.close()
    with pytest.raises(RuntimeError):
        fetcher.submit("late", reply("late"))
    loads.go.set()  # the two running downloads end now
    for thread in fetcher.threads():
        thread.join(WAIT)
    assert fetcher.threads() == []
    assert out.empty() and loads.calls == 2  # nothing delivered after close; the three queued never started


def test_near_the_deadline_reads_give_up_with_the_round() -> None:
    loads, out = Loads(), queue.Queue[Fetched]()
    loads.go.set()
    with _fetcher(loads, out, workers=1, deadline_in=5.0) as fetcher:  # 5 s left, transfer 60 s
        fetcher.submit("a", reply("a"))
        out.get(timeout=WAIT)
    assert len(loads.timeouts) == 1 and MIN_READ_S <= loads.timeouts[0] <= 5.0
    loads2 = Loads()
    loads2.go.set()
    with _fetcher(loads2, out, workers=1, deadline_in=600.0) as fetcher:
        fetcher.submit("a", reply("a"))
        out.get(timeout=WAIT)
        fetcher.release()
        fetcher.submit("b", reply("b"))
        out.get(timeout=WAIT)
    assert loads2.timeouts == [60.0]  # far from the deadline: the configured timeout, one client for both


def test_clients_are_kept_for_the_next_round_except_those_made_near_a_deadline() -> None:
    loads, out = Loads(), queue.Queue[Fetched]()
    loads.go.set()
    pool = ClientPool(loads.client, 60.0)
    for _ in range(3):  # three rounds of two downloads on two threads
        with _fetcher(loads, out, workers=2, pool=pool) as fetcher:
            for node in ("a", "b"):
                fetcher.submit(node, reply(node))
            for _ in range(2):
                out.get(timeout=WAIT)
                fetcher.release()
        for thread in fetcher._threads:
            thread.join(WAIT)
    assert 1 <= len(loads.timeouts) <= 2 and set(loads.timeouts) == {60.0}  # made in the first round only
    kept = list(pool._idle)
    with _fetcher(loads, out, workers=1, deadline_in=5.0, pool=pool) as fetcher:
        fetcher.submit("c", reply("c"))
        out.get(timeout=WAIT)
    for thread in fetcher._threads:
        thread.join(WAIT)
    assert loads.timeouts[-1] <= 5.0 and pool._idle == kept  # the short-timeout client was closed, not kept
    pool.close()
    assert all(client.closed for client in kept) and pool._idle == []


def test_a_small_update_is_loaded_on_the_calling_thread_with_its_client() -> None:
    """The round's own client on the round's thread (the experiment's, as before the download threads): no
    thread, no client made."""
    loads, out = Loads(), queue.Queue[Fetched]()
    loads.go.set()
    pool = ClientPool(loads.client, 60.0)
    own = loads.client(60.0)
    with _fetcher(loads, out, workers=1, pool=pool) as fetcher:
        first = fetcher.fetch_here("a", reply("a"), own)
        fetcher.release()
        second = fetcher.fetch_here("bad-b", reply("bad-b"), own)
        fetcher.release()
        assert fetcher.threads() == [] and out.empty()  # no thread, nothing through `deliver`
    assert first.error is None and isinstance(second.error, ValueError)
    assert loads.threads == {threading.current_thread().name}
    assert loads.timeouts == [60.0] and pool._idle == []  # the one client made here; the pool made none
