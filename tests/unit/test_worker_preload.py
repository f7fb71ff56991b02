"""The warm worker imports the round's fedsilo modules once, so a round's forked child imports none of them.

Before `worker_process._preload`, every round's child imported them itself: 97-126 ms of a 160-190 ms round
process on the shared 2-core machine. The child here runs `_run_task` as a round's child does (with a request
that fails to parse, so no plan runs) and reports the modules it had to import.
"""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_the_next_rounds_process_is_forked_before_its_task_arrives() -> None:
    """Fork (6-7 ms) and the child's first touches of torch happen between rounds: a round's process waits for
    its task, reads it itself, answers, and the worker forks the next one; `stop` ends both."""
    import time
    from multiprocessing.connection import Pipe

    from fedsilo.node.workerwire import decode, encode

    ours, theirs = Pipe()
    proc = subprocess.Popen([sys.executable, "-m", "fedsilo.node.worker_process", str(theirs.fileno()), "--parent",
                             "0"], pass_fds=(theirs.fileno(),))  # fmt: skip
    theirs.close()
    try:
        assert ours.poll(120) and decode(ours.recv_bytes())[0] == {"op": "ready"}
        deadline = time.monotonic() + 30
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        first = _children(proc.pid)
        assert len(first) == 1  # forked with no task in sight
        ours.send_bytes(encode({"op": "task", "task_id": "t1", "request": "{}"}))  # unparsable: answered FS-error
        assert ours.poll(60)
        answer, _ = decode(ours.recv_bytes())
        assert answer["task_id"] == "t1" and answer["ok"] is False
        while (_children(proc.pid) in ([], first)) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _children(proc.pid)
        assert len(second) == 1 and second != first  # the next round's process, again ahead of its task
        ours.send_bytes(encode({"op": "stop"}))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ours.close()


def test_the_source_lines_torch_seeding_reads_are_preloaded() -> None:
    code = ("import linecache, torch.random\nfrom fedsilo.node import worker_process as wp\n"
            "assert torch.random.__file__ not in linecache.cache\nwp._preload()\n"
            "print(torch.random.__file__ in linecache.cache and wp.__file__ in linecache.cache)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
