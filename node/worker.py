"""The daemon's handle on its long-lived training worker (`worker_process.py`).

The worker runs plan code, so it is started like an untrusted program: `subprocess` rather than
multiprocessing (whose spawn hands the child the parent's `sys.argv`, the node directory among them,
and its whole environment), with an allow-listed environment, an empty working folder, no inherited
file but one socket, and stdout piped back to node.log. Frames on the socket are `workerwire`'s, never
pickles. A worker that dies is noticed through a pidfd (no polling) and restarted by the daemon.

With `[node] sandbox = "bwrap"` the worker runs inside bubblewrap (`sandbox.py`) with one dataset's files
in its view: a round on another dataset restarts it with that dataset (`run`), and a machine that cannot
enforce the sandbox gets each round refused (SANDBOX_UNAVAILABLE) rather than run with less. The round's
algorithm state folder lies outside the view, so its files are copied into the worker's state folder
and back (`_StateFolder`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from typing import Any

from fedsilo.common.errors import ErrorCode, FedsiloError, WorkerProtocolError

from .config import NodeConfig
from .daemon_round import _copy_files
from .sandbox import SandboxState, bwrap_argv, dataset_paths, probe
from .stages import RoundFailure
from .workerwire import decode, recv_frame, send_frame

log = logging.getLogger("fedsilo.node.worker")

EventHandler = Callable[[dict[str, Any]], None]

ENV_NAMES = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "LD_LIBRARY_PATH",
                       "PYTHONPATH", "PYTHONHASHSEED", "VIRTUAL_ENV", "COVERAGE_PROCESS_START"})  # fmt: skip
ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "CUBLAS_", "TORCH_", "PYTORCH_")
"""What the worker inherits: locale, paths, and the knobs of torch and its maths libraries. Everything else
(FEDSILO_NETWORK names a folder of every party's credentials on a test machine) stays with the daemon."""

LINE_BYTES = 64 * 1024
"""A line of the worker's output copied to node.log; a longer one is cut (plan code prints what it likes)."""


REUSE_CPU_SHARE = 0.25
"""A job's round process takes the job's next round only while the CPU time it has used stays under this share
of `[limits] sandbox_cpu_s`: RLIMIT_CPU counts a process's whole life, so a round in a reused process still has
at least three quarters of its limit; the next round past it gets a fresh process."""


class WorkerCrashed(FedsiloError):
    """The worker process died while running a task or before it became ready."""


def setup_file_logging(log_file: Path, level: int = logging.INFO) -> None:
    """Log to NODEDIR/logs/node.log (shared by daemon and worker; appends are line-atomic)."""
    from .worker_process import LOG_FORMAT

    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file for h in root.handlers):
        return
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: the allow-listed names of `environ`, and unbuffered output."""
    env = {k: v for k, v in environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """The daemon's handle on the worker process."""

    def __init__(self, nodedir: Path, start_timeout: float) -> None:
        self.nodedir = nodedir
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._pidfd: int | None = None
        self._home: str | None = None
        self._state: str | None = None
        self._inner_pid: int | None = None
        self._closing = threading.Event()  # set by terminate(): the daemon is stopping
        self.datasets: tuple[str, ...] = ()
        """The dataset files in the sandboxed worker's view."""
        self.sandbox: SandboxState = probe(NodeConfig.load(nodedir).node.sandbox)
        """What the last start (or the daemon's own start) found; status.json and the GUI show it."""
        self._rounds = 0
        self._started_once = False
        self._job: str | None = None
        """`reuse_key` of the last round, while its process may take the next round of the same job."""

    @property
    def pid(self) -> int | None:
        """The process that runs Python: inside the sandbox, bwrap's grandchild."""
        if self._proc is None:
            return None
        return self._inner_pid or self._proc.pid

    @property
    def refused(self) -> bool:
        """The config asks for a sandbox this machine cannot enforce: rounds are refused."""
        return self.sandbox.mode != "off" and not self.sandbox.active

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, datasets: Sequence[str] | None = None) -> None:
        """Start the worker and wait until it has imported torch; sandboxed, with `datasets` (default: those of
        the last start, else the node's most recently added dataset) in its view.

        A `terminate()` (the daemon stopping) during start-up is not an error: `start` then returns
        without a worker, and `alive` stays False; so does a sandbox this machine cannot enforce (`refused`).
        """
        if self._closing.is_set():
            return
        cfg = NodeConfig.load(self.nodedir)
        state = probe(cfg.node.sandbox)
        if state != self.sandbox or not self._started_once:
            log.log(logging.ERROR if state.mode != "off" and not state.active else logging.INFO, "sandbox %s: %s%s",
                    state.mode, "active" if state.active else "INACTIVE", f" ({state.detail})")  # fmt: skip
        self.sandbox, self._started_once = state, True
        if self.refused:
            return
        parent, child = Pipe()
        self._home = tempfile.mkdtemp(prefix="fedsilo-worker-")  # its working folder: empty, outside NODEDIR
        args = [sys.executable, "-m", "fedsilo.node.worker_process", str(child.fileno()), "--parent",
                str(os.getpid() if cfg.node.sandbox == "off" else 0), "--nice", str(cfg.node.worker_nice)]  # fmt: skip
        if cfg.node.threads:
            args += ["--threads", str(cfg.node.threads)]
        env = {**worker_env(os.environ), "HOME": self._home, "TMPDIR": self._home}
        if cfg.node.sandbox != "off":
            self.datasets = tuple(datasets) if datasets is not None else self.datasets or _latest_dataset(self.nodedir)
            self._state = tempfile.mkdtemp(prefix="fedsilo-state-")
            args = bwrap_argv([*args, "--confine"], self._home, self.datasets, [self.nodedir], [self._state],
                              gpu=cfg.limits.allow_gpu)  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=self._home, pass_fds=(child.fileno(),))  # fmt: skip
        child.close()
        self._proc, self._conn = proc, parent
        self._pidfd = _pidfd(proc.pid)
        threading.Thread(target=_copy_output, args=(proc, cfg.paths.log_file), name="fedsilo-worker-log",
                         daemon=True).start()  # fmt: skip
        if self._closing.is_set():  # terminate() ran before _proc was set: it could not end this process
            proc.terminate()
        ready = self._wait(self.start_timeout)
        if parent in ready:
            try:
                header, _ = decode(parent.recv_bytes(4096))
                if header.get("op") == "ready":
                    self._inner_pid = _python_pid(proc.pid) if cfg.node.sandbox != "off" else None
                    log.info("worker started (pid %s, sandbox %s%s)", self.pid, cfg.node.sandbox,
                             f", dataset files {list(self.datasets)}" if cfg.node.sandbox != "off" else "")  # fmt: skip
                    return
            except (EOFError, OSError, WorkerProtocolError):
                pass
        self.kill()
        if self._closing.is_set():
            log.info("worker start-up interrupted: the node is stopping")
            return
        if not ready:
            raise WorkerCrashed(f"the worker did not become ready within {self.start_timeout:.0f}s")
        raise WorkerCrashed("the worker exited during start-up; see logs/node.log")

    def _wait(self, timeout: float | None) -> list[Any]:
        assert self._conn is not None
        waitables: list[Any] = [self._conn] + ([self._pidfd] if self._pidfd is not None else [])
        if self._pidfd is None and timeout is None:
            timeout = 1.0  # no pidfd (an old kernel): look at the process once a second
        return wait(waitables, timeout=timeout)

    def run(self, task_id: str, header: dict[str, Any], blobs: dict[str, Any], on_event: EventHandler,
            max_reply_bytes: int) -> tuple[dict[str, Any], dict[str, memoryview]]:  # fmt: skip
        """Run one task; returns the worker's result frame (header, blobs). `WorkerCrashed` when the process
        dies, `WorkerProtocolError` when it sends what is not a frame or more than `max_reply_bytes`."""
        if self.sandbox.mode != "off":
            wanted = tuple(dataset_paths(header.get("record") or {}))
            if not self.alive or wanted != self.datasets:
                if self.alive:
                    log.info("[%s] the worker restarts with this round's dataset in its view", task_id)
                self.kill()
                self.start(wanted)
        if self.refused:
            raise RoundFailure(ErrorCode.SANDBOX_UNAVAILABLE, f"this node's config asks for sandbox "
                               f"'{self.sandbox.mode}', which this machine cannot enforce; the round is refused "
                               "rather than run with less", "sandbox")  # fmt: skip
        if self._proc is None or self._conn is None or not self.alive:
            raise WorkerCrashed("the worker is not running")
        if self._state is None:
            return self._exchange(task_id, header, blobs, on_event, max_reply_bytes)
        with _StateFolder(Path(header["state_dir"]), Path(self._state) / str(self._next_round())) as inside:
            return self._exchange(task_id, {**header, "state_dir": str(inside)}, blobs, on_event, max_reply_bytes)

    def _next_round(self) -> int:
        self._rounds += 1
        return self._rounds

    def _exchange(self, task_id: str, header: dict[str, Any], blobs: dict[str, Any], on_event: EventHandler,
                  max_reply_bytes: int) -> tuple[dict[str, Any], dict[str, memoryview]]:  # fmt: skip
        assert self._proc is not None and self._conn is not None
        conn, proc = self._conn, self._proc
        key = reuse_key(header)
        try:
            self._drain(max_reply_bytes)
            if self._job is not None and self._job != key:  # another job's round: a fresh process takes it
                send_frame(conn.fileno(), {"op": "retire"})
            self._job = None
            send_frame(conn.fileno(), {**header, "op": "task", "task_id": task_id}, blobs)
        except (BrokenPipeError, OSError) as exc:
            raise WorkerCrashed(f"cannot reach the worker: {exc}") from exc
        while True:
            self._wait(None)
            # Drain the socket first: a reply sent just before the process ended still counts.
            if conn.poll():
                try:  # over max_reply_bytes: WorkerProtocolError, and the connection is unusable from here
                    reply, reply_blobs = recv_frame(conn.fileno(), max_reply_bytes)
                except (EOFError, ConnectionError) as exc:
                    raise WorkerCrashed(f"worker exited (code {proc.poll()})") from exc
                if reply.get("op") == "died":  # the round's process ended without answering the task in flight
                    return {**_died(reply), "task_id": task_id}, {}
                if reply.get("task_id") != task_id:
                    continue
                if reply.get("op") == "result":
                    self._job = key if _reusable(reply, header) else None
                    return reply, reply_blobs
                on_event(reply)
                continue
            if proc.poll() is not None:
                raise WorkerCrashed(f"worker exited with code {proc.returncode}")

    def _drain(self, max_bytes: int) -> None:
        """Frames that arrived between tasks: a late event, or the worker's word that the last round's process
        died after answering (then the next task goes to a fresh one, no `retire` needed)."""
        assert self._conn is not None
        while self._conn.poll():
            try:
                head, _ = recv_frame(self._conn.fileno(), max_bytes)
            except (EOFError, ConnectionError) as exc:
                raise WorkerCrashed(f"worker exited (code {self._proc.poll() if self._proc else None})") from exc
            if head.get("op") == "died":
                log.warning("the last round's process ended after answering: %s", str(head.get("message"))[:500])
                self._job = None

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish, then terminate it if it does not."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                send_frame(conn.fileno(), {"op": "stop"})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        self.kill()

    def terminate(self) -> None:
        """End the process from another thread (the daemon stopping): the thread inside `run` then sees
        WorkerCrashed, one inside `start` returns quietly, and no new worker starts."""
        self._closing.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def kill(self) -> None:
        proc, conn = self._proc, self._conn
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if conn is not None:
            conn.close()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
        for folder in (self._home, self._state):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._proc, self._conn, self._pidfd, self._home, self._state = None, None, None, None, None
        self._inner_pid, self._job = None, None


def reuse_key(header: dict[str, Any]) -> str | None:
    """What a round must share with the last one to run in its process: the researcher and job (`job`), the plan's
    source, the dataset's record and the node's config; None when it must have a fresh process (`[node]
    round_process = "round"`, or a header without `job`)."""
    config = header.get("config") or {}
    if not header.get("job") or (config.get("node") or {}).get("round_process", "job") != "job":
        return None
    text = json.dumps([header["job"], header.get("source"), header.get("record"), config], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reusable(result: dict[str, Any], header: dict[str, Any]) -> bool:
    """A round that succeeded in a process that has CPU time to spare (`REUSE_CPU_SHARE`): its process may take
    the job's next round. The CPU figure is the process's own word: a false one only shortens its own rounds."""
    limit = ((header.get("config") or {}).get("limits") or {}).get("sandbox_cpu_s", 3600)
    used = result.get("process_cpu_s")
    return result.get("ok") is True and isinstance(used, int | float) and 0 <= used < REUSE_CPU_SHARE * limit


def _died(notice: dict[str, Any]) -> dict[str, Any]:
    """The worker's `died` notice as the task's failed result (`worker_process._next_round`)."""
    return {"op": "result", "ok": False, "code": str(notice.get("code", "FS501")),
            "message": str(notice.get("message", "the round's process died"))[:2000],
            "stage": str(notice.get("stage", "training"))}  # fmt: skip


class _StateFolder:
    """A round's algorithm state folder seen through the sandbox: the daemon's files copied into `inside`
    (a folder in the worker's view), and what the round wrote there copied back, regular files only."""

    def __init__(self, outside: Path, inside: Path) -> None:
        self.outside, self.inside = outside, inside

    def __enter__(self) -> Path:
        self.inside.mkdir(parents=True)
        _copy_files(self.outside, self.inside)
        return self.inside

    def __exit__(self, *exc: object) -> None:
        try:
            _copy_files(self.inside, self.outside)
        finally:  # the whole exchange folder: plan code may have written beside its round's folder too
            for entry in os.scandir(self.inside.parent):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def _latest_dataset(nodedir: Path) -> tuple[str, ...]:
    """The files of the node's most recently added dataset: the likeliest next round's, so that the worker
    started with the daemon seldom restarts for the first round."""
    from .datasets import DatasetStore

    try:
        records = DatasetStore(nodedir).list()
    except Exception:  # a store that cannot be read now: the first round's dataset decides
        log.exception("cannot list the datasets for the worker's first view")
        return ()
    return tuple(dataset_paths(records[-1])) if records else ()


def _python_pid(pid: int) -> int | None:
    """The deepest descendant of `pid` (bwrap -> its init -> Python), from /proc's children lists."""
    found = None
    current = pid
    for _ in range(4):
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            break
        if not children:
            break
        current = found = int(children[0])
    return found


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _copy_output(proc: subprocess.Popen[bytes], log_file: Path) -> None:
    """The worker's stdout and stderr (its log records, plan prints, a native crash's message) into node.log,
    line by line (O_APPEND: lines from the daemon and the worker do not tear)."""
    assert proc.stdout is not None
    with proc.stdout, open(log_file, "ab") as out:
        for line in iter(lambda: proc.stdout.readline(LINE_BYTES), b""):  # type: ignore[union-attr]
            out.write(line if line.endswith(b"\n") else line + b"\n")
            out.flush()
