"""The node's long-lived training worker: one spawned process that imports torch once and runs rounds.

The daemon talks to it over a pipe: it sends (task_id, TrainRequest JSON); the worker answers with
("event", task_id, message JSON) for streamed scalars and ("reply", task_id, message JSON) at the end.
A worker that dies is noticed through its process sentinel (no polling) and restarted by the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

from fedsilo.common.errors import FedsiloError

log = logging.getLogger("fedsilo.node.worker")

EventHandler = Callable[[bytes], None]


class WorkerCrashed(FedsiloError):
    """The worker process died while running a task or before it became ready."""


def setup_file_logging(log_file: Path, level: int = logging.INFO) -> None:
    """Log to NODEDIR/logs/node.log (shared by daemon and worker; appends are line-atomic)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file for h in root.handlers):
        return
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)


def _warm_up(threads: int | None) -> None:
    """Import torch and take one optimiser step so that no round pays for lazy imports (about 2 s)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())  # first optimiser pulls in torch._dynamo
    model(torch.zeros(1, 2)).sum().backward()
    optimizer.step()


def worker_main(nodedir: str, conn: Connection) -> None:
    """Entry point of the worker process."""
    from fedsilo.network.credentials import Credentials
    from fedsilo.network.filestore_client import FileStoreClient
    from fedsilo.network.messages import TrainRequest

    from .audit import AuditLog
    from .config import NodeConfig
    from .datasets import DatasetStore
    from .plans import PlanStore
    from .round import RoundContext, execute_round

    _die_with_parent()
    # Ctrl-C in the daemon's terminal reaches the whole process group; the daemon decides when the worker ends
    # (a KeyboardInterrupt here would print a traceback in the middle of a clean stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = NodeConfig.load(nodedir)
    setup_file_logging(cfg.paths.log_file)
    _warm_up(cfg.node.threads)

    creds = Credentials.load(cfg.paths.network)
    ctx = RoundContext(
        config=cfg,
        datasets=DatasetStore(cfg.dir, data_roots=cfg.node.data_roots),
        plans=PlanStore(cfg.dir),
        audit=AuditLog(cfg.dir),
        filestore=FileStoreClient(creds.filestore, cfg.timeouts),
    )
    conn.send(("ready", "", b""))
    log.info("worker ready (pid %s)", mp.current_process().pid)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            break
        if item is None:
            break
        task_id, request_json = item
        request = TrainRequest.model_validate_json(request_json)

        def emit(message, task_id=task_id) -> None:
            conn.send(("event", task_id, message.to_json()))

        reply = execute_round(request, ctx, emit)
        conn.send(("reply", task_id, reply.to_json()))
    ctx.filestore.close()


def _die_with_parent() -> None:
    """On Linux, have the kernel end the worker when the daemon dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        log.debug("prctl unavailable; the worker may outlive a killed daemon until its round ends")


class Worker:
    """The daemon's handle on the worker process."""

    def __init__(self, nodedir: Path, start_timeout: float) -> None:
        self.nodedir = nodedir
        self.start_timeout = start_timeout
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closing = threading.Event()  # set by terminate(): the daemon is stopping

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        """Spawn the worker and wait until it has imported torch and opened its stores.

        A `terminate()` (the daemon stopping) during start-up is not an error: `start` then returns
        without a worker, and `alive` stays False.
        """
        if self._closing.is_set():
            return
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(str(self.nodedir), child), name="fedsilo-worker", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if self._closing.is_set():  # terminate() ran before _proc was set: it could not end this process
            proc.terminate()
        ready = wait([parent, proc.sentinel], timeout=self.start_timeout)
        if parent in ready:
            try:
                kind, _, _ = parent.recv()
                if kind == "ready":
                    log.info("worker started (pid %s)", proc.pid)
                    return
            except (EOFError, OSError):
                pass
        self.kill()
        if self._closing.is_set():
            log.info("worker start-up interrupted: the node is stopping")
            return
        if not ready:
            raise WorkerCrashed(f"the worker did not become ready within {self.start_timeout:.0f}s")
        raise WorkerCrashed("the worker exited during start-up; see logs/node.log")

    def run(self, task_id: str, request_json: str, on_event: EventHandler) -> bytes:
        """Run one task; returns the reply JSON, or raises WorkerCrashed when the process dies."""
        if self._proc is None or self._conn is None or not self._proc.is_alive():
            raise WorkerCrashed("the worker is not running")
        conn, proc = self._conn, self._proc
        try:
            conn.send((task_id, request_json))
        except (BrokenPipeError, OSError) as exc:
            raise WorkerCrashed(f"cannot reach the worker: {exc}") from exc
        while True:
            wait([conn, proc.sentinel])
            # Drain the pipe first: a reply sent just before the process ended still counts.
            if conn.poll():
                try:
                    kind, tid, payload = conn.recv()
                except (EOFError, OSError) as exc:
                    raise WorkerCrashed(f"worker exited (code {proc.exitcode})") from exc
                if tid != task_id:
                    continue
                if kind == "reply":
                    return payload
                on_event(payload)
                continue
            if not proc.is_alive():
                proc.join(timeout=1)
                raise WorkerCrashed(f"worker exited with code {proc.exitcode}")

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish, then terminate it if it does not."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        proc.join(timeout)
        self.kill()

    def terminate(self) -> None:
        """End the process from another thread (the daemon stopping): the thread inside `run` then sees
        WorkerCrashed, one inside `start` returns quietly, and no new worker starts."""
        self._closing.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()

    def kill(self) -> None:
        proc, conn = self._proc, self._conn
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if conn is not None:
            conn.close()
        self._proc, self._conn = None, None
