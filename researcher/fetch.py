"""A round's updates downloaded while the round still waits for the other nodes (issue 11).

`TrainingRound` hands each reply that passed its message checks to `Fetcher.submit` and goes back to its
waiter; a worker thread downloads, parses and checks the reply's blobs (the round's `load` function) and
hands the outcome, a `Fetched`, to `deliver`: the round's waiter queue. The round's thread wakes on it as
on a message and folds the update in itself, so `FedAlgorithm.add` never runs on two threads at once.

    with Fetcher(load, waiter.queue.put, workers=3, clients=pool, deadline=deadline) as fetcher:
        fetcher.submit("node-a", reply)       # returns at once; a worker downloads node-a's blobs
        done = waiter.get(deadline)           # ... the Fetched, once they are in (or why they are not)
        algorithm.add(...); fetcher.release() # the slot is free for the next download

Bounds: `workers` threads, each with a `FileStoreClient` of its own (a `requests.Session` is not documented
as safe to share between threads; one session each is; a `ClientPool` keeps them for the next round), and at
most `workers` updates taken out of the store but not yet folded (`release`): memory holds at most that many
updates beyond what the algorithm keeps. A download cannot be cut off from another thread (it blocks in a
socket read, and the client keeps its socket), so a thread reads with a timeout no longer than the time the
round has left when it starts a download: a stalled download ends about when the round does. `close` drops
downloads not started and discards the results of those still running; their threads end with them (daemon
threads: they never hold the interpreter's exit).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedsilo.common.buffers import BufferPool
from fedsilo.common.errors import TransferError
from fedsilo.common.serialization import check_compatible, params_from_bytes
from fedsilo.network.filestore_client import FileStoreClient
from fedsilo.network.messages import BlobRef, TrainReply

from .algorithms.base import Params
from .compression import Compression, decode_params
from .update_checks import InvalidUpdate, check_params

log = logging.getLogger(__name__)

FETCH_THREADS = 4
"""Downloads at once (at most one per node of the round). Measured (2026-11-30, bench/run.py, 2-core VM, rounds
2..R medians, A/B in one sitting, old = serial downloads on the round's thread): K=10 large 12.00 and 10.22 s old
(18 %, 13 % foreign CPU), 9.98 and 10.02 s new (23 %, 1 %), handle_s 3.30/2.54 -> 1.52/1.24 s; K=3 large 3.03 and
2.71 s old, 3.10 and 2.63 s new (1 % foreign), handle_s 0.66 -> 0.19-0.30 s. The round's thread is free, the wall
time is not lower here: downloads over loopback are CPU-bound (TLS at both ends, sha256, the finite check) on the
two cores the nodes and the store use, and the serial loop was already busy whenever a reply waited. The overlap
pays where downloads wait on a network. 2 threads were no better than 4 (11.1 s against 10.8-11.4 s, 33 % foreign).
bench/researcher_fetch.py (no nodes, 0 % foreign): 10 x 40 MB replies at once, last fold 1.46 s after the last
reply serial, 1.21 s on 2 threads, 1.19 s on 4; 150 ms apart, 0.145 / 0.149 / 0.183 s (serial keeps up)."""
RECEIVE_BUFFERS = BufferPool()
"""The updates' download buffers, reused once an update is folded in (`common.buffers.BufferPool`): the
researcher's process is the user's, whose allocator gives a 40 MB buffer back to the kernel when it is freed."""
MIN_READ_S = 1.0
"""The shortest read timeout a worker's client gets near the deadline (a download started at the deadline)."""
LOAD_HERE_BYTES = 1 << 20
"""A reply whose blobs total at most this is loaded on the round's thread (`Fetcher.fetch_here`): such a download
takes about 3 ms here, and handing it to a thread cost more than it saved. Measured (2026-11-30, bench/run.py K=10
small, 200 KB updates, load 2-3, 1 % foreign CPU): researcher CPU 68 ms a round serial, 84 ms with every update
on a thread."""

ClientFactory = Callable[[float], FileStoreClient]
"""A read timeout in seconds -> a new client of the store (one per worker thread)."""
Load = Callable[[FileStoreClient, TrainReply], dict[str, Params]]
"""A reply's blobs, downloaded with the given client, parsed and checked; raises why they are unusable."""


@dataclass
class Fetched:
    """One reply's download: `blobs` (the update, parsed and checked) or `error` (why not), on a worker."""

    node: str
    reply: TrainReply
    blobs: dict[str, Params] | None
    error: Exception | None
    seconds: float


class UpdateLoader:
    """What a fetch thread does with a reply (a `Load`): its blobs downloaded, parsed in place and checked.

    "params" must match the model (a codec blob is decoded first); every blob must be finite. `masked`
    (secure aggregation): "params" is int64 in the model's layout, only parsed, never read alone. Reads only
    what it was built with, so it runs on several threads at once.

        load = UpdateLoader(global_params, max_bytes=2 * 40_000_000)
        blobs = load(client, reply)          # {"params": {...}}; raises TransferError, SerializationError...
    """

    def __init__(
        self, global_params: Params, max_bytes: int, compression: Compression | None = None, masked: bool = False
    ) -> None:
        self.global_params, self.max_bytes = global_params, max_bytes
        self.compression, self.masked = compression, masked

    def __call__(self, files: FileStoreClient, reply: TrainReply) -> dict[str, Params]:
        try:
            if self.masked:
                loaded = {"params": self._parse(files, reply.params)}
            else:
                loaded = {name: self._checked(files, name, ref) for name, ref in reply.blobs.items()}
        except TransferError:
            raise  # not downloaded (the store unreachable, say): left to retention
        except Exception:
            files.release_all(reply.blobs.values())  # downloaded but unusable: the node is dropped all the same
            raise
        files.release_all(reply.blobs.values())  # in memory now: the store's copy is no one's any more
        return loaded

    def _checked(self, files: FileStoreClient, name: str, ref: BlobRef) -> Params:
        if name == "params" and self.compression is not None:  # a codec blob: decoded before `add`
            data = files.download_buffer(ref, max_bytes=self.max_bytes, pool=RECEIVE_BUFFERS)  # parsed in place
            params = decode_params(data, self.global_params, self.compression)
        else:
            params = self._parse(files, ref)
        if name == "params":
            check_compatible(params, self.global_params)
        try:
            check_params(params)
        except InvalidUpdate as exc:
            raise InvalidUpdate(f"blob '{name}': {exc}") from None
        return params

    def _parse(self, files: FileStoreClient, ref: BlobRef) -> Params:
        # parsed in place: the tensors are views into the buffer just filled (downloaded, or copied out of an
        # inline ref without a request: `download_buffer`), which nothing else holds
        return params_from_bytes(files.download_buffer(ref, max_bytes=self.max_bytes, pool=RECEIVE_BUFFERS), copy=False)


class ClientPool:
    """The download threads' file-store clients, kept from one round to the next (at most `keep` idle).

    A new client costs its TLS context and handshake: about 4 ms each here, and with four new clients a round the
    researcher's CPU per K=10 small round went 75 -> 101 ms (2026-11-30, bench/run.py, load 5). A client made
    with a read timeout shorter than `transfer` (near a deadline) is closed after its download, never kept.

        pool = ClientPool(lambda t: FileStoreClient(settings, timeouts.model_copy(update={"transfer": t})), 60.0)
        client = pool.take(60.0)
        ...
        pool.give(client, 60.0)
    """

    def __init__(self, make: ClientFactory, transfer: float, keep: int = FETCH_THREADS) -> None:
        self.transfer = transfer
        self._make, self._keep = make, keep
        self._idle: list[FileStoreClient] = []
        self._lock = threading.Lock()

    def take(self, read_timeout: float) -> FileStoreClient:
        """A client whose reads time out after `read_timeout` s (an idle one when that is `transfer`)."""
        if read_timeout < self.transfer:
            return self._make(read_timeout)
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._make(self.transfer)

    def give(self, client: FileStoreClient, read_timeout: float) -> None:
        """A thread is done with `client` (taken with `read_timeout`): kept for later, or closed."""
        with self._lock:
            if read_timeout >= self.transfer and len(self._idle) < self._keep:
                self._idle.append(client)
                return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class Fetcher:
    """Downloads replies' blobs on up to `workers` threads (see the module docstring); a context manager."""

    def __init__(
        self,
        load: Load,
        deliver: Callable[[Fetched], None],
        workers: int,
        clients: ClientPool,
        deadline: float,
    ) -> None:
        if workers < 1:
            raise ValueError("a Fetcher needs at least one worker")
        self._load, self._deliver, self._workers = load, deliver, workers
        self._clients, self._deadline = clients, deadline
        self._tasks: queue.SimpleQueue[tuple[str, TrainReply] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []  # started one a task, up to `workers`
        self._cond = threading.Condition()
        self._slots = workers  # updates that may still be taken out of the store before the round folds one
        self._closed = False

    def submit(self, node: str, reply: TrainReply) -> None:
        """Download `reply`'s blobs on a worker; the outcome goes to `deliver` (never after `close`)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("this Fetcher is closed")
        self._tasks.put((node, reply))
        if len(self._threads) < self._workers:
            thread = threading.Thread(target=self._work, name=f"fedsilo-fetch-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def release(self) -> None:
        """The round has folded (or dropped) one delivered update: another may be taken out of the store."""
        with self._cond:
            self._slots += 1
            self._cond.notify()

    def close(self) -> None:
        """Stop: downloads not started are dropped, results of running ones discarded; returns at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for _ in self._threads:
            self._tasks.put(None)

    def threads(self) -> list[threading.Thread]:
        """The workers still alive (a closed Fetcher's end with their download)."""
        return [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch_here(self, node: str, reply: TrainReply, client: FileStoreClient) -> Fetched:
        """`reply`'s blobs loaded on the calling thread with `client` (the round's own: small updates, see
        `LOAD_HERE_BYTES`); it takes a slot as a worker's download does: `release` it once folded."""
        with self._cond:
            self._slots -= 1
        return self._fetch(node, reply, lambda: client)

    # ------------------------------------------------------------------ worker threads
    def _read_timeout(self) -> float:
        """Reads give up with the round near its deadline (see the module docstring)."""
        return min(self._clients.transfer, max(self._deadline - time.monotonic(), MIN_READ_S))

    def _fetch(self, node: str, reply: TrainReply, client: Callable[[], FileStoreClient]) -> Fetched:
        t0 = time.perf_counter()
        try:
            return Fetched(node, reply, self._load(client(), reply), None, time.perf_counter() - t0)
        except Exception as exc:  # the round says what it means: a drop, or its own failure
            return Fetched(node, reply, None, exc, time.perf_counter() - t0)

    def _work(self) -> None:
        held: list[tuple[FileStoreClient, float]] = []  # this thread's client and its read timeout

        def client() -> FileStoreClient:
            wanted = self._read_timeout()
            if held and wanted < held[0][1]:  # near the deadline: a new client whose reads end with the round
                self._clients.give(*held.pop())
            if not held:
                held.append((self._clients.take(wanted), wanted))
            return held[0][0]

        try:
            while (task := self._next()) is not None:
                done = self._fetch(*task, client)
                with self._cond:  # under the lock: nothing is delivered once `close` returned
                    if self._closed:
                        log.debug("download of %s's update finished after the round ended; discarded", done.node)
                        return
                    self._deliver(done)
        finally:
            for c, timeout in held:
                self._clients.give(c, timeout)

    def _next(self) -> tuple[str, TrainReply] | None:
        """The next task once a slot is free; None once closed."""
        task = self._tasks.get()
        with self._cond:
            while self._slots == 0 and not self._closed:
                self._cond.wait()
            if self._closed or task is None:
                return None
            self._slots -= 1
            return task
