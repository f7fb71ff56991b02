"""Start and stop fedsilo daemons as child processes (quickstart, benchmarks, tests).

`start_process` runs a command with its output in a log file and waits on a readiness check; a
process that exits or never gets ready raises with the tail of its log. `stop_process` asks with
SIGTERM and kills the process group when asking is not enough.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

FEDSILO: list[str] = [sys.executable, "-c", "from fedsilo.common.cli import main; main()"]
"""The `fedsilo` command run by this interpreter (no PATH lookup, same virtual environment)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    log_path: str | Path,
    timeout: float,
    what: str,
) -> None:
    """Poll `ready()` until true; raise with the log's tail if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before it was ready; log {log_path}:\n{log_tail(log_path)}"
            )
        if ready():
            return
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; log {log_path}:\n{log_tail(log_path)}")


def start_process(
    args: Sequence[str],
    log_path: str | Path,
    ready: Callable[[], bool] | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `args` with stdout+stderr appended to `log_path`; wait until `ready()` is true."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in the parent's terminal does not reach the daemon first
        )
    if ready is not None:
        wait_until(ready, proc, log_path, timeout, " ".join(str(a) for a in args[:6]))
    return proc


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
    """Ask the process to stop (SIGTERM by default), kill its group when it does not; return its status."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
    return proc.returncode
