"""The training worker's process: `python -m fedsilo.node.worker_process FD [--threads N]`.

Started by the daemon (`worker.Worker`) with an allow-listed environment, an empty working folder and
one inherited socket (FD): no node directory, no credentials, no connection to the broker or the file
store. It imports torch once, then runs the rounds the daemon hands it (`round.execute_round`) and
answers with frames (`workerwire`). Its log lines go to stdout, which the daemon copies to node.log.

Each round runs in a child forked from this warm process (medians 54-128 ms with its exit): the child confines itself
(`sandbox_limits.confine`, with `--confine`) before any plan code, answers on the inherited socket and
exits; what a plan changed (modules it patched, memory it filled, limits it exhausted) dies with it. A
child that dies without answering is answered for by this process (`_answer_for`). This process stays
single-threaded in torch (OpenMP after a fork hangs a child whose parent ran a parallel region: measured,
a 2-thread warm-up then a matmul in the child never returned); each child sets the node's thread count.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .sandbox_limits import SandboxLimits, confine
from .stages import new_error_id, released_text
from .workerwire import recv_frame, send_frame

log = logging.getLogger("fedsilo.node.worker")

FROM_DAEMON_MAX = 1 << 40
"""The daemon's frames are trusted (it checked the blobs' hashes and sizes); the limit only rules out junk."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def _warm_up(threads: int | None) -> int:
    """Import torch and take one optimiser step so that no round pays for lazy imports (about 2 s), on one
    thread (see the module's docstring); returns the thread count rounds use (`threads`, else torch's)."""
    import torch

    default = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())  # first optimiser pulls in torch._dynamo
    model(torch.zeros(1, 2)).sum().backward()
    optimizer.step()
    return default


def _preload() -> None:
    """Import the round's own modules (fedsilo's, never plan code) here, once: each round's forked child inherits
    them. Measured (2026-11-30, 2 cores at load 6-9): a child that imported them itself spent 97-126 ms of every
    round on it, of a 160-190 ms fork-to-exit (29-46 ms with them preloaded); the confinement is applied in the
    child as before. `torch_datasets` holds CsvDataset and ImageFolderDataset, which plans read data with."""
    import fedsilo.common.datasets.torch_datasets
    import fedsilo.common.training_args
    import fedsilo.network.messages  # noqa: F401

    from . import config, round  # noqa: F401


def _warm_dataset(record: dict[str, Any]) -> None:
    """Parse the round's CSV here with fedsilo's reader (the default options `CsvDataset` uses), so each round's
    child finds it in the content-keyed cache (`csvfiles.cached_parse`) instead of parsing it again: the cache
    of a child dies with it. Measured (2026-11-30, load 10-13): 0.195 s to parse a 2,000 x 33 shard, 0.054 s
    from the cache. The node's own dataset, never the researcher's code; a file the cache would not keep is
    left to the child, and any error is the child's to report."""
    from fedsilo.common.datasets.csvfiles import CSV_CACHE_MAX_FILE
    from fedsilo.common.datasets.tables import read_table

    path = record.get("path")
    if record.get("data_type") != "csv" or not isinstance(path, str):
        return
    try:
        if os.path.getsize(path) <= CSV_CACHE_MAX_FILE:
            read_table(path, copy=False)
    except Exception as exc:  # the child reads it again and reports what is wrong
        log.debug("dataset not pre-read: %s", exc)


def _die_with_parent(parent: int) -> None:
    """On Linux, have the kernel end the worker when the daemon dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        log.debug("prctl unavailable; the worker may outlive a killed daemon until its round ends")
    if parent and os.getppid() != parent:  # the daemon died before prctl took effect: the signal will never come
        os._exit(1)  # (parent 0: in the sandbox, whose own init is the parent; bwrap --die-with-parent does this)


Send = Callable[..., None]
"""`send(header, blobs=None)`: one frame to the daemon (`workerwire.send_frame` on the worker's socket)."""


def _run_task(header: dict[str, Any], blobs: dict[str, Any], plan_cache: dict, send: Send) -> None:
    from fedsilo.common.training_args import TrainingArgs
    from fedsilo.network.messages import Message, parse_task

    from .config import NodeConfig
    from .round import RoundContext, RoundFailure, WorkerTask, execute_round

    task_id = header["task_id"]

    def emit(message: Message) -> None:
        send({"op": "event", "task_id": task_id, "message": message.to_json().decode("utf-8")})

    try:
        request = parse_task(header["request"])  # a TrainRequest or an EvaluateRequest
        ctx = RoundContext(NodeConfig.model_validate(header["config"]), plan_cache)
        task = WorkerTask(request, header["source"], TrainingArgs.parse(header["args"]), header["record"], blobs,
                          Path(header["state_dir"]))  # fmt: skip
        result = execute_round(task, ctx, emit)
    except RoundFailure as exc:
        _fail(send, task_id, str(exc.code), exc.message, exc.stage)
        return
    except Exception as exc:  # the catch-all that keeps the worker alive on any bug
        error_id = new_error_id()
        log.exception("[%s] unexpected error in round [error %s]", task_id, error_id)
        _fail(send, task_id, "FS900", f"{released_text(exc)} (error {error_id}: the node's log holds the details)",
              "round")  # fmt: skip
        return
    send({"op": "result", "task_id": task_id, "ok": True, "sample_size": result.sample_size,
                 "metrics": result.metrics, "applied_caps": result.applied_caps, "train_s": result.train_s,
                 "test_samples": result.test_samples, "device": result.device, "stage_s": result.stage_s},
         result.blobs)  # fmt: skip


def _fail(send: Send, task_id: str, code: str, message: str, stage: str) -> None:
    send({"op": "result", "task_id": task_id, "ok": False, "code": code, "message": message, "stage": stage})


def _round_in_child(header: dict[str, Any], blobs: dict[str, Any], conn: Connection, threads: int,
                    confined: bool) -> None:  # fmt: skip
    """Fork; the child confines itself, runs the round, answers and exits; this process waits and answers
    for a child that died without answering."""
    task_id = str(header.get("task_id", ""))
    limits = _limits(header)

    def send(head: dict[str, Any], frame_blobs: dict[str, Any] | None = None) -> None:
        send_frame(conn.fileno(), head, frame_blobs)

    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it never returns into the worker's loop
        code = 3
        try:
            mp.current_process().name = "fedsilo-round"
            if confined:
                try:
                    confine(limits)
                except OSError as exc:
                    log.error("[%s] the round cannot be confined: %s", task_id, exc)
                    _fail(send, task_id, "FS505", f"the sandbox's limits cannot be applied here ({exc})",
                          "sandbox")  # fmt: skip
                    code = 0
                    return
            import torch

            torch.set_num_threads(threads)
            _run_task(header, blobs, {}, send)
            code = 0
        except BaseException:  # SystemExit or KeyboardInterrupt from plan code too: the parent answers
            log.exception("[%s] the round's process failed", task_id)
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    if confined:
        _wipe(Path.cwd())  # the next round, maybe another researcher's, finds nothing this one left behind
    if status != 0:
        code, message = _death(status, usage.ru_utime + usage.ru_stime, limits, confined)
        log.error("[%s] %s", task_id, message)
        _fail(send, task_id, code, message, "training")


def _wipe(folder: Path) -> None:
    """Everything in `folder` (the sandbox's only writable place), links removed, never followed."""
    for entry in os.scandir(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("cannot remove %s from the worker's folder: %s", entry.name, exc)


def _death(status: int, cpu_s: float, limits: SandboxLimits, confined: bool) -> tuple[str, str]:
    """(code, message) for a round's process that ended without answering."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if confined and (sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s)):
            return "FS504", f"the round used up its CPU time limit ({limits.cpu_s} s) and was stopped ({name})"
        if sig == signal.SIGKILL:
            return "FS504", "the round's process was killed (SIGKILL): out of memory, or stopped by the node's host"
        return "FS501", f"the round's process died of {name}"
    return "FS501", f"the round's process exited with code {os.WEXITSTATUS(status)} before answering"


def _limits(header: dict[str, Any]) -> SandboxLimits:
    limits = (header.get("config") or {}).get("limits") or {}
    default = SandboxLimits()
    memory = None if limits.get("allow_gpu") else int(limits.get("sandbox_memory_mb", default.memory_mb or 0))
    return SandboxLimits(memory_mb=memory,
                         cpu_s=int(limits.get("sandbox_cpu_s", default.cpu_s)),
                         file_mb=int(limits.get("sandbox_file_mb", default.file_mb)))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsilo.node.worker_process")
    parser.add_argument("fd", type=int)
    parser.add_argument("--parent", type=int, required=True, help="the daemon's pid; 0 = do not check (sandbox)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--confine", action="store_true", help="apply [limits] sandbox_* to each round's process")
    opts = parser.parse_args(argv)
    _die_with_parent(opts.parent)
    # Ctrl-C in the daemon's terminal reaches the whole process group; the daemon decides when the worker ends
    # (a KeyboardInterrupt here would print a traceback in the middle of a clean stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mp.current_process().name = "fedsilo-worker"
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    threads = _warm_up(opts.threads)
    _preload()
    conn = Connection(opts.fd)
    send_frame(conn.fileno(), {"op": "ready"})
    log.info("worker ready (pid %s)", os.getpid())
    while True:
        try:
            header, blobs = recv_frame(conn.fileno(), FROM_DAEMON_MAX)
        except (EOFError, OSError):
            break
        if header.get("op") != "task":
            break
        _warm_dataset(header.get("record") or {})
        _round_in_child(header, blobs, conn, threads, opts.confine)


if __name__ == "__main__":
    main()
