"""The warm worker imports the round's fedsilo modules once, so a round's forked child imports none of them.

Before `worker_process._preload`, every round's child imported them itself: 97-126 ms of a 160-190 ms round
process on the shared 2-core machine. The child here runs `_run_task` as a round's child does (with a request
that fails to parse, so no plan runs) and reports the modules it had to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, Pipe

from fedsilo.node.workerwire import decode, encode

CHILD = r"""
import json, os, sys
from fedsilo.node import worker_process as wp
wp._warm_up(1)
wp._preload()
before = set(sys.modules)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    sent = []
    wp._run_task({"task_id": "t", "request": "{}"}, {}, {}, sent.append)
    from fedsilo.common.datasets import CsvDataset  # what the peerbench and quickstart plans read with
    new = sorted(m for m in set(sys.modules) - before if m.startswith("fedsilo"))
    os.write(write, json.dumps({"new": new, "answered": len(sent)}).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 65536).decode())
"""


def test_round_child_imports_no_fedsilo_module() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["answered"] == 1  # the malformed request was answered with a failure, as in a real round
    assert report["new"] == []


WARM = r"""
import json, os, sys
from fedsilo.common.datasets import tables
from fedsilo.node import worker_process as wp
path = sys.argv[1]
wp._warm_dataset({"data_type": "csv", "path": path})
read, write = os.pipe()
if os.fork() == 0:
    def refuse(*args):
        raise AssertionError("the round's child parsed the CSV again")
    tables._parse = refuse
    from fedsilo.common.datasets import CsvDataset
    try:
        rows = len(CsvDataset(path, target="label").y)
    except AssertionError as exc:
        rows = str(exc)
    os.write(write, json.dumps(rows).encode())
    os._exit(0)
os.wait()
print(os.read(read, 65536).decode())
"""


def test_round_child_finds_the_dataset_parsed(tmp_path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(50)), encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", WARM, str(csv)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == 50


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@contextlib.contextmanager
def _worker() -> Iterator[tuple[subprocess.Popen[bytes], Connection]]:
    """A real worker process on one end of a pipe, ready; killed after."""
    ours, theirs = Pipe()
    proc = subprocess.Popen([sys.executable, "-m", "fedsilo.node.worker_process", str(theirs.fileno()), "--parent",
                             "0"], pass_fds=(theirs.fileno(),))  # fmt: skip
    theirs.close()
    try:
        assert ours.poll(120) and decode(ours.recv_bytes())[0] == {"op": "ready"}
        yield proc, ours
    finally:
        if proc.poll() is None:
            proc.kill()
        ours.close()


def _child_other_than(pid: int, old: list[int]) -> list[int]:
    """The worker's round process once it is not `old` (forked ahead of its task), within 30 s."""
    deadline = time.monotonic() + 30
    while _children(pid) in ([], old) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _children(pid)


def _ask(conn: Connection, task_id: str) -> dict:
    conn.send_bytes(encode({"op": "task", "task_id": task_id, "request": "{}"}))  # unparsable: answered FS-error
    assert conn.poll(60)
    answer, _ = decode(conn.recv_bytes())
    assert answer["task_id"] == task_id and answer["ok"] is False, answer
    return answer


def test_the_next_rounds_process_is_forked_before_its_task_arrives() -> None:
    """Fork (6-7 ms) and the child's first touches of torch happen between jobs: a round's process waits for
    its task, reads it itself, answers, and once the daemon retires it the worker forks the next one."""
    with _worker() as (proc, conn):
        first = _child_other_than(proc.pid, [])
        assert len(first) == 1  # forked with no task in sight
        _ask(conn, "t1")
        conn.send_bytes(encode({"op": "retire"}))  # the daemon's next task is another job's
        second = _child_other_than(proc.pid, first)
        assert len(second) == 1 and second != first  # the next job's process, again ahead of its task
        conn.send_bytes(encode({"op": "stop"}))
        assert proc.wait(30) == 0


def test_a_jobs_next_round_runs_in_the_same_process_and_stop_ends_the_worker() -> None:
    """Without `retire` the round's process takes the next task itself (no fork: at K=10 the workers' CPU per node
    and round went 63 -> 25 ms), and `stop` read by it (not by a fresh child) still ends the worker at once."""
    with _worker() as (proc, conn):
        first = _child_other_than(proc.pid, [])
        _ask(conn, "t1")
        _ask(conn, "t2")
        assert _children(proc.pid) == first  # the same process answered both
        conn.send_bytes(encode({"op": "stop"}))
        assert proc.wait(30) == 0


def test_a_round_process_that_dies_is_answered_for() -> None:
    """A job's process killed (here between two of its rounds, as the kernel's OOM killer might): the worker says
    `died` with the reason, which the daemon takes as the in-flight task's answer, and forks a fresh process."""
    with _worker() as (proc, conn):
        first = _child_other_than(proc.pid, [])
        _ask(conn, "t1")
        os.kill(first[0], signal.SIGKILL)
        assert conn.poll(60)
        notice, _ = decode(conn.recv_bytes())
        assert notice["op"] == "died" and notice["code"] == "FS504" and "SIGKILL" in notice["message"], notice
        assert len(_child_other_than(proc.pid, first)) == 1
        _ask(conn, "t2")  # the fresh process takes the next task
        conn.send_bytes(encode({"op": "stop"}))
        assert proc.wait(30) == 0


def test_the_source_lines_torch_seeding_reads_are_preloaded() -> None:
    code = ("import linecache, torch.random\nfrom fedsilo.node import worker_process as wp\n"
            "assert torch.random.__file__ not in linecache.cache\nwp._preload()\n"
            "print(torch.random.__file__ in linecache.cache and wp.__file__ in linecache.cache)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
