"""The training worker's process: `python -m fedsilo.node.worker_process FD [--threads N]`.

Started by the daemon (`worker.Worker`) with an allow-listed environment, an empty working folder and
one inherited socket (FD): no node directory, no credentials, no connection to the broker or the file
store. It imports torch once, then runs the rounds the daemon hands it (`round.execute_round`) and
answers with frames (`workerwire`). Its log lines go to stdout, which the daemon copies to node.log.

Each job's rounds run in a child forked from this warm process ahead of its first task (`_next_round`): the
child warms up, reads the task from the daemon's socket itself, confines itself (`sandbox_limits.confine`, with
`--confine`) before any plan code, answers on the inherited socket, then reads the next frame: another task
(the daemon sends one only of the same job, plan, dataset and config: `worker.Worker`) runs in the same process;
`retire` or `stop` ends it. What a plan changed (modules it patched, memory it filled, limits it exhausted) dies
with the process, so it never reaches another job's round. A child that dies without answering is answered for
by this process (`died`), which learnt the first task's id and limits from the child's line on a pipe. This
process stays single-threaded in torch (OpenMP after a fork hangs a child whose parent ran a parallel region:
measured, a 2-thread warm-up then a matmul in the child never returned); each child sets the node's thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedsilo.common.malloc import keep_freed_memory

from .sandbox_limits import SandboxLimits, confine
from .stages import new_error_id, released_text
from .workerwire import recv_frame, send_frame

log = logging.getLogger("fedsilo.node.worker")

INFO_BYTES = 16 * 1024
"""The round process's line to the worker (`_task_line`)."""
LIMIT_KEYS = ("allow_gpu", "sandbox_memory_mb", "sandbox_cpu_s", "sandbox_file_mb")
FROM_DAEMON_MAX = 1 << 40
"""The daemon's frames are trusted (it checked the blobs' hashes and sizes); the limit only rules out junk."""
STOPPED = 64
"""A round's process read `stop` after its rounds: its exit status, so that this process stops too."""

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

    _preload_source_lines()


STACK_MODULES = ("torch.random", "torch.cuda", "torch.cuda.random", "torch.xpu", "torch.xpu.random", "torch._compile",
                 "torch._dynamo.eval_frame", "fedsilo.node.worker_process", "fedsilo.node.round", "fedsilo.node.stages",
                 "fedsilo.node.trainer", "fedsilo.common.training_plan")  # fmt: skip
"""The files on the stack when a plan seeds torch: without CUDA, torch's `manual_seed` records where each seed
came from (`traceback.format_stack`, for CUDA and again for XPU), which reads the source lines of every frame."""


def _preload_source_lines() -> None:
    """Read those files' lines into `linecache` here, once: each round's process inherits them. Measured
    (py-spy of a K=3 peerbench run, 2026-11-30): `format_stack` reading them took 4-5 ms of every round."""
    import importlib
    import linecache

    for name in STACK_MODULES:
        try:
            linecache.getlines(importlib.import_module(name).__file__ or "")
        except Exception:  # a torch build without one of them: nothing to warm
            continue


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
        started = time.perf_counter()
        result = execute_round(task, ctx, emit)
        sent_at = header.get("sent_at")  # the daemon's perf_counter (CLOCK_MONOTONIC: one clock for the machine)
        if isinstance(sent_at, float) and 0 <= started - sent_at < 1e6:
            result.stage_s["handover"] = started - sent_at  # frame sent -> received -> forked -> round starts
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
                 "test_samples": result.test_samples, "device": result.device, "stage_s": result.stage_s,
                 "process_cpu_s": _process_cpu_s()},
         result.blobs)  # fmt: skip


def _process_cpu_s() -> float:
    """CPU seconds this process has used (what RLIMIT_CPU counts): the daemon retires a job's process before
    its rounds together come near the per-round limit (`worker.REUSE_CPU_SHARE`)."""
    times = os.times()
    return times.user + times.system


def _fail(send: Send, task_id: str, code: str, message: str, stage: str) -> None:
    send({"op": "result", "task_id": task_id, "ok": False, "code": code, "message": message, "stage": stage})


def _next_round(conn: Connection, threads: int, confined: bool) -> dict[str, Any] | None:
    """Fork the next round's process ahead of its task; it warms itself up, reads the task from the daemon's
    socket, tells this process what it took (one line on a pipe, before any plan code), confines itself, runs
    the round, answers and exits. This process waits for it, cleans up and answers for a child that died
    without answering. Returns the round's dataset record (to warm the next child's cache), or None once the
    daemon said stop or closed the socket.

    Why ahead of the task: fork, and the copy-on-write faults of a child's first touches of the warm process's
    memory, then fall between rounds. Measured (2026-11-30, idle 2-core machine): fork to a running child 6-7 ms,
    and the peerbench small model built in 7-16 ms in a fresh child against 2-5 ms in the warm process."""
    info_r, info_w = os.pipe()
    # The warm process's objects go to the collector's permanent generation: the child's collections skip them
    # (its `gc.collect` after each round: 0.1-0.2 ms instead of 107-112 ms) and never write their headers
    # (copy-on-write faults). The young generations are collected first, so that what this process left in cycles
    # since the last fork (warming the dataset) is freed rather than frozen.
    gc.collect(1)
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it never returns into the worker's loop
        os.close(info_r)
        _round_process(conn, info_w, threads, confined)
    os.close(info_w)
    _, status, usage = os.wait4(pid, 0)
    with os.fdopen(info_r, "rb") as pipe:
        line = pipe.readline(INFO_BYTES)
    try:
        info = json.loads(line) if line else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("op") != "task":
        if status != 0 and not (isinstance(info, dict) and info.get("op") == "stop"):
            log.error("the round's process ended before it read a task (status %s)", status)
            time.sleep(1.0)  # a child that cannot start: do not fork in a tight loop; the daemon sees no answer
            return {}
        return None
    if confined:
        _wipe(Path.cwd())  # the next job's round, maybe another researcher's, finds nothing this one left behind
    task_id, limits = str(info.get("task_id", "")), _limits(info)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == STOPPED:
        return None
    if status != 0:  # it was running the daemon's task in flight (its first or a later one of the same job)
        code, message = _death(status, usage.ru_utime + usage.ru_stime, limits, confined)
        log.error("[%s] %s", task_id, message)
        _sender(conn)({"op": "died", "task_id": task_id, "code": code, "message": message, "stage": "training"})
    record = info.get("record")
    return record if isinstance(record, dict) else {}


def _round_process(conn: Connection, info_w: int, threads: int, confined: bool) -> None:
    """The round's process (see `_next_round`); ends with `os._exit`."""
    code, task_id = 3, ""
    send = _sender(conn)
    try:
        mp.current_process().name = "fedsilo-round"
        _die_with_parent(0)  # a fork does not inherit the parent-death signal
        keep_freed_memory()  # a job's rounds allocate and free the same model-sized tensors: reuse, not refault
        _warm_child()
        try:
            header, blobs = recv_frame(conn.fileno(), FROM_DAEMON_MAX)
        except (EOFError, OSError):
            header, blobs = {"op": "stop"}, {}
        if header.get("op") != "task":
            os.write(info_w, b'{"op": "stop"}\n')
            code = 0
            return
        task_id = str(header.get("task_id", ""))
        os.write(info_w, _task_line(header))
        os.close(info_w)  # plan code never gets to write to the worker's pipe
        if confined:
            try:
                confine(_limits(header))
            except OSError as exc:
                log.error("[%s] the round cannot be confined: %s", task_id, exc)
                _fail(send, task_id, "FS505", f"the sandbox's limits cannot be applied here ({exc})", "sandbox")
                code = 0
                return
        import torch

        torch.set_num_threads(threads)
        code = _job_rounds(conn, header, blobs, send)
    except BaseException:  # SystemExit or KeyboardInterrupt from plan code too: the parent answers
        log.exception("[%s] the round's process failed", task_id)
    finally:
        sys.stdout.flush()
        os._exit(code)


def _job_rounds(conn: Connection, header: dict[str, Any], blobs: dict[str, Any], send: Send) -> int:
    """Run the task, then each further task the daemon sends this process; the exit status once it says
    `retire` (0), `stop` (`STOPPED`) or closes the socket. What the rounds of a job share: the plan class and
    what its module caches (`plan_cache`, `sys.modules`), the parsed dataset, torch's warmed-up state.
    Measured (2026-11-30, peerbench small): a process per round cost 57 ms of CPU a round with 1 node (35 user,
    22 system: 4,240 page faults, the copy-on-write of the warm worker's pages, its warm-up, the exit, and the
    plan's module, model and data built again); at K=10 (`bench/scaling.py`) the workers' CPU per node and
    round went from 63 to 25 ms and the round from 0.545 to 0.366 s."""
    plan_cache: dict[str, Any] = {}
    while True:
        _run_task(header, blobs, plan_cache, send)
        # What the round left in reference cycles (a plan's own, say) goes now, not when the cyclic collector next
        # runs: a job's process allocates few Python objects, so that can be many rounds, each holding its model,
        # gradients and blobs (fedsilo's own such cycle held 150 MB a round, peerbench large, until round.py's
        # `_scalars` stopped closing over the round). 0.1-0.2 ms: this process's objects only (`gc.freeze`).
        del header, blobs  # the last round's blobs go before the next round's arrive
        gc.collect()
        try:
            header, blobs = recv_frame(conn.fileno(), FROM_DAEMON_MAX)
        except (EOFError, OSError):
            return 0
        if header.get("op") != "task":
            return STOPPED if header.get("op") == "stop" else 0


def _task_line(header: dict[str, Any]) -> bytes:
    """What the worker needs of a task, in a few KiB (a pipe holds 64 KiB, and the worker reads it only once the
    child has ended): the task id, the sandbox limits, and where the dataset is (to warm the next child)."""
    config = header.get("config") if isinstance(header.get("config"), dict) else {}
    limits = config.get("limits") if isinstance(config.get("limits"), dict) else {}
    record = header.get("record") if isinstance(header.get("record"), dict) else {}
    info = {"op": "task", "task_id": str(header.get("task_id", ""))[:200],
            "config": {"limits": {k: limits.get(k) for k in LIMIT_KEYS if k in limits}},
            "record": {k: record.get(k) for k in ("data_type", "path") if isinstance(record.get(k), str)}}  # fmt: skip
    return json.dumps(info).encode()[: INFO_BYTES - 1] + b"\n"


def _sender(conn: Connection) -> Send:
    def send(head: dict[str, Any], frame_blobs: dict[str, Any] | None = None) -> None:
        send_frame(conn.fileno(), head, frame_blobs)

    return send


def _warm_child() -> None:
    """One optimiser step on a small model, before the task arrives: the child's first touches of torch's and
    Python's pages (copy-on-write after the fork) happen while it waits rather than in the round."""
    import torch

    from fedsilo.network.messages import ScalarMessage

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.zeros(8, 32)), torch.zeros(8, dtype=torch.int64)).backward()
    optimizer.step()
    # the scalars a round streams: 4.4 ms of a round's training in its process's first two (py-spy, 2026-11-30)
    ScalarMessage(sender="warm-up", node_id="warm-up", job_id="warm-up", round=0, dataset_id="warm-up", key="loss",
                  value=0.0, step=1, epoch=1, num_samples=1, total_samples=1).to_json()  # fmt: skip


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


def _lower_priority(nice: int) -> None:
    """Run at niceness `nice` from now on, or stay lower if already there; the rounds' processes inherit it."""
    if nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsilo.node.worker_process")
    parser.add_argument("fd", type=int)
    parser.add_argument("--parent", type=int, required=True, help="the daemon's pid; 0 = do not check (sandbox)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--confine", action="store_true", help="apply [limits] sandbox_* to each round's process")
    parser.add_argument("--nice", type=int, default=0, help="the niceness to run at, at least ([node] worker_nice)")
    opts = parser.parse_args(argv)
    _lower_priority(opts.nice)
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
    while (record := _next_round(conn, threads, opts.confine)) is not None:
        _warm_dataset(record)  # the next round's child finds the dataset of this one parsed


if __name__ == "__main__":
    main()
