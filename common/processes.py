"""Start and stop fedsilo daemons as child processes (quickstart, benchmarks, tests).

`start_process` runs a command with its output in a log file and waits on a readiness check; a
process that exits or never gets ready raises with the tail of its log. `stop_process` asks with
SIGTERM and kills the process group when asking is not enough. `ChildProcess` is a long-lived
child (a broker, the file store) that dies with the process that started it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None
# Looked up here, not in the forked child: between fork and exec only async-signal-safe work is safe.


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `sig` when the thread that started it dies.

    The kernel sends it even on SIGKILL of the parent, which no handler or `atexit` in the parent can
    do. It is tied to the forking *thread*: start long-lived children from a thread that lives as long
    as the process (the main thread). None where prctl is missing (not Linux).
    """
    if _prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: the signal will never come
            os.kill(os.getpid(), sig)

    return preexec


def exit_reason(returncode: int | None) -> str:
    """`killed by SIGKILL`, `exited with status 1`, ... for a Popen return code."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group that may be gone already (e.g. gunicorn workers orphaned by their master)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


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
    interval: float = 0.05,
) -> None:
    """Poll `ready()` every `interval` s until true; raise with the log tail if `proc` exits first or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before it was ready; log {log_path}:\n{log_tail(log_path)}"
            )
        if ready():
            return
        time.sleep(interval)
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
    proc = spawn(args, log_path, env=env, cwd=cwd)
    if ready is not None:
        wait_until(ready, proc, log_path, timeout, " ".join(str(a) for a in args[:6]))
    return proc


def spawn(
    args: Sequence[str],
    log_path: str | Path,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    pdeathsig: int | None = None,
    stdin: int = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start `args` in a new session (its own process group) with stdout+stderr appended to `log_path`.

    With `pdeathsig`, the child gets that signal when this thread dies (`die_with_parent`).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            list(args),
            stdin=stdin,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in the parent's terminal does not reach the daemon first
            preexec_fn=die_with_parent(pdeathsig) if pdeathsig else None,
        )


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


class ChildProcess:
    """A long-lived child process (broker, file store): its own process group, output in `log_path`.

    It dies with its parent (`pdeathsig`), and `stop()` also kills what is left of its process group,
    so that helpers it forked (gunicorn workers) do not keep its ports.
    """

    def __init__(self, log_path: str | Path) -> None:
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def spawn(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        pdeathsig: int = signal.SIGTERM,
        stdin: int = subprocess.DEVNULL,
    ) -> None:
        self._proc = spawn(args, self.log_path, env=env, pdeathsig=pdeathsig, stdin=stdin)
        self.pid = self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it ended (negative: the signal that killed it); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; then kill what is left of its process group."""
        if self._proc is None:
            return
        stop_process(self._proc, timeout=timeout)
        kill_group(self._proc.pid)
        self._proc = None
