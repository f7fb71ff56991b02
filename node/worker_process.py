"""The training worker's process: `python -m fedsilo.node.worker_process FD [--threads N]`.

Started by the daemon (`worker.Worker`) with an allow-listed environment, an empty working folder and
one inherited socket (FD): no node directory, no credentials, no connection to the broker or the file
store. It imports torch once, then runs the rounds the daemon hands it (`round.execute_round`) and
answers with frames (`workerwire`). Its log lines go to stdout, which the daemon copies to node.log.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .workerwire import decode, encode

log = logging.getLogger("fedsilo.node.worker")

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def _warm_up(threads: int | None) -> None:
    """Import torch and take one optimiser step so that no round pays for lazy imports (about 2 s)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())  # first optimiser pulls in torch._dynamo
    model(torch.zeros(1, 2)).sum().backward()
    optimizer.step()


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
    if os.getppid() != parent:  # the daemon died before prctl took effect: the signal will never come
        os._exit(1)


def _run_task(header: dict[str, Any], blobs: dict[str, bytes], plan_cache: dict, send: Callable[[bytes], None]) -> None:
    from fedsilo.common.training_args import TrainingArgs
    from fedsilo.network.messages import Message, parse_task

    from .config import NodeConfig
    from .round import RoundContext, RoundFailure, WorkerTask, execute_round

    task_id = header["task_id"]

    def emit(message: Message) -> None:
        send(encode({"op": "event", "task_id": task_id, "message": message.to_json().decode("utf-8")}))

    try:
        request = parse_task(header["request"])  # a TrainRequest or an EvaluateRequest
        ctx = RoundContext(NodeConfig.model_validate(header["config"]), plan_cache)
        task = WorkerTask(request, header["source"], TrainingArgs.parse(header["args"]), header["record"], blobs,
                          Path(header["state_dir"]))  # fmt: skip
        result = execute_round(task, ctx, emit)
    except RoundFailure as exc:
        send(encode({"op": "result", "task_id": task_id, "ok": False, "code": str(exc.code), "message": exc.message,
                     "stage": exc.stage}))  # fmt: skip
        return
    except Exception as exc:  # the catch-all that keeps the worker alive on any bug
        log.exception("[%s] unexpected error in round", task_id)
        send(encode({"op": "result", "task_id": task_id, "ok": False, "code": "FS900",
                     "message": f"{type(exc).__name__}: {exc}", "stage": "round"}))  # fmt: skip
        return
    send(encode({"op": "result", "task_id": task_id, "ok": True, "sample_size": result.sample_size,
                 "metrics": result.metrics, "applied_caps": result.applied_caps, "train_s": result.train_s,
                 "test_samples": result.test_samples},
                result.blobs))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsilo.node.worker_process")
    parser.add_argument("fd", type=int)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None)
    opts = parser.parse_args(argv)
    _die_with_parent(opts.parent)
    # Ctrl-C in the daemon's terminal reaches the whole process group; the daemon decides when the worker ends
    # (a KeyboardInterrupt here would print a traceback in the middle of a clean stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mp.current_process().name = "fedsilo-worker"
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    _warm_up(opts.threads)
    conn = Connection(opts.fd)
    conn.send_bytes(encode({"op": "ready"}))
    log.info("worker ready (pid %s)", os.getpid())
    plan_cache: dict = {}
    while True:
        try:
            header, blobs = decode(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if header.get("op") != "task":
            break
        _run_task(header, blobs, plan_cache, conn.send_bytes)


if __name__ == "__main__":
    main()
