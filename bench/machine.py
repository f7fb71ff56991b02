"""How busy the machine is, and which part of a benchmark used the CPU (from /proc; Linux only).

Other engineers run tests on the same small machines: each benchmark reports the CPU share of
processes outside its own process tree, and can wait for a quiet machine before it measures.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (from /proc; Linux only)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # utime + stime + cutime + cstime: each round runs in a child the worker forks and waits for, and a child's
    # CPU shows only in its parent's cutime once it is gone. Counting utime + stime alone put the round children
    # under "foreign" (2026-11-30, K=3: "node workers" 32 ms per round, while the children import and train)
    return sum(int(x) for x in fields[11:15])


def _busy_ticks() -> int:
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal


class CpuMeter:
    """Share of the machine's CPU used by processes *outside* this benchmark's process tree."""

    def __init__(self) -> None:
        self.enabled = Path("/proc/stat").is_file()
        self._start: tuple[float, int, dict[int, int]] | None = None
        self.components: dict[str, float] = {}

    def _ours(self) -> dict[int, int]:
        return {pid: _cpu_ticks(pid) for pid in _descendants(os.getpid())}

    def start(self) -> None:
        if self.enabled:
            self._start = (time.monotonic(), _busy_ticks(), self._ours())

    def stop(self) -> float | None:
        """Foreign CPU since `start`, as a fraction of all cores (0 = nothing else ran, 1 = all cores busy).

        `self.components` then holds the CPU seconds each part of the benchmark used meanwhile."""
        if not self.enabled or self._start is None:
            return None
        t0, busy0, ours0 = self._start
        ours1 = self._ours()
        tick = os.sysconf("SC_CLK_TCK")
        self.components = {}
        for pid, ticks in ours1.items():
            part = _component(pid)
            self.components[part] = self.components.get(part, 0.0) + (ticks - ours0.get(pid, 0)) / tick
        ours = sum(ours1.values()) - sum(ours0.get(pid, 0) for pid in ours1)
        foreign = (_busy_ticks() - busy0) - ours
        total = (time.monotonic() - t0) * tick * (os.cpu_count() or 1)
        return max(0.0, foreign / total) if total > 0 else None


def _component(pid: int) -> str:
    """Which part of the benchmark a process is, from its command line."""
    if pid == os.getpid():
        return "researcher"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    # the worker is `python -m fedsilo.node.worker_process` since issue 8 (a subprocess, not multiprocessing),
    # the file store `fedsilo.network.filestore.serve` (uvicorn) and the embedded broker its own process since
    # issue 7: with only the old names, 339 of 486 ms per K=3 round were counted as "other"
    parts = [
        ("mosquitto", "broker"),
        ("embedded_broker", "broker"),
        ("gunicorn", "file store"),
        ("filestore.serve", "file store"),
        ("node start", "node daemons"),
        ("node.worker_process", "node workers"),
        ("multiprocessing", "node workers"),
        ("network start", "network process"),
    ]
    for needle, part in parts:
        if needle in cmd:
            return part
    return "other"


def wait_until_quiet(threshold: float, max_wait: float, window: float = 5.0) -> float | None:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` of the CPU; last reading."""
    meter = CpuMeter()
    if not meter.enabled or threshold <= 0:
        return None
    deadline = time.monotonic() + max_wait
    while True:
        meter.start()
        time.sleep(window)
        share = meter.stop()
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share
        print(f"  machine busy: other processes use {share:.0%} of the CPU; waiting", flush=True)
