"""Plans run in a sandbox: a node daemon as a process, real rounds, approved plans acting as a hostile researcher.

Each attack is an approved plan whose `training_step` tries it once and otherwise trains as usual, so that
on an unconfined node the round succeeds (what these tests failed on before the sandbox): read the node's
credentials, its dataset db, /etc/passwd or another dataset's file; connect to the broker; fork; allocate
past the memory limit. Each must fail its round with an ErrorReply, and the daemon must run the next round.
The last tests confine a forked process directly (CPU time, file size, threads) and start a node whose
bubblewrap cannot run (FS505). About 2-3 minutes per broker on the shared 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.node.sandbox import bwrap_argv, dataset_paths, probe, python_paths
from fedsilo.node.sandbox_limits import SandboxLimits, confine
from fedsilo.node.worker_process import _death
from tests.support.brokers import BOTH
from tests.support.one_node import OneNode, approve
from tests.support.plans import LOGREG_PLAN

pytestmark = pytest.mark.broker("mosquitto")  # the node is the subject here; tests/conftest.py

MEMORY_MB = 256

STEP = "    def training_step(self, data, target):"


def attack(body: str) -> str:
    """LOGREG_PLAN whose first training step runs `body` (indented 8 spaces, `self.model_args` at hand)."""
    return LOGREG_PLAN.replace(STEP, STEP + "\n        if not getattr(self, 'tried', False):\n"
                               "            self.tried = True\n" + body)  # fmt: skip


READ = attack("            open(self.model_args['path'], 'rb').read()\n")
CONNECT = attack("""            import socket
            socket.create_connection(("127.0.0.1", self.model_args["port"]), timeout=10).close()
""")
# Bounded: on an unconfined node this forks 32 children that exit at once (the round then succeeds); a real
# bomb would take the shared test machine down before the sandbox existed.
FORK = attack("""            import os
            for _ in range(32):
                if os.fork() == 0:
                    os._exit(0)
                os.wait()
""")
ALLOCATE = attack(f"            blob = bytearray({MEMORY_MB + 256} * 2**20)\n            del blob\n")
# Leaves a mark in its process's memory and checks the marks it finds: a job's rounds share a process
# (`[node] round_process = "job"`, the default), another job's round must find none; `die` ends the process.
MARK = attack("""            import builtins, os, signal
            seen = getattr(builtins, "fedsilo_test_jobs", [])
            builtins.fedsilo_test_jobs = seen + [self.model_args["job"]]
            if seen != self.model_args["seen"]:
                raise AssertionError(f"this process ran rounds of {seen} before")
            if self.model_args.get("die"):
                os.kill(os.getpid(), signal.SIGKILL)
""")
PLANS = [LOGREG_PLAN, READ, CONNECT, FORK, ALLOCATE, MARK]


@pytest.fixture(scope="module", params=BOTH)
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNode]:
    root = tmp_path_factory.mktemp(f"sandbox-{request.param}")
    one = OneNode.start(root, request.param, datasets=("d1", "d2"), plans=PLANS,
                        limits={"sandbox_memory_mb": MEMORY_MB})  # fmt: skip
    yield one
    one.stop()


def assert_refused_then_next_round_runs(node: OneNode, reply: object, code: str = "FS500") -> None:
    assert reply.kind == "error", reply  # type: ignore[attr-defined]
    assert (reply.code, reply.stage) == (code, "training"), reply  # type: ignore[attr-defined]
    assert node.node.alive
    assert node.round(LOGREG_PLAN).kind == "train_reply"


def test_status_shows_the_sandbox(node: OneNode) -> None:
    assert node.round(LOGREG_PLAN).kind == "train_reply"  # a round reads its own dataset in the sandbox
    sandbox = node.status()["sandbox"]
    assert sandbox["mode"] == "bwrap" and sandbox["active"] is True, sandbox


@pytest.mark.parametrize("target", ["network.json", "db/datasets.json", "/etc/passwd", "d2.csv"])
def test_a_plan_reads_nothing_outside_its_dataset(node: OneNode, target: str) -> None:
    path = target if target.startswith("/") else str(node.data / target if target.endswith(".csv")
                                                      else node.nodedir / target)  # fmt: skip
    assert Path(path).is_file()  # the file is there, outside the sandbox
    reply = node.round(READ, "d1", model_args={"path": path})
    assert_refused_then_next_round_runs(node, reply)
    assert "FileNotFoundError" in reply.message and path not in reply.message


def test_a_plan_cannot_reach_the_broker(node: OneNode) -> None:
    port = int(node.net.read_state()["mqtt_port"])
    reply = node.round(CONNECT, model_args={"port": port})
    assert_refused_then_next_round_runs(node, reply)
    assert "ConnectionRefusedError" in reply.message  # a network namespace of its own: nothing listens there


def test_a_plan_cannot_fork(node: OneNode) -> None:
    reply = node.round(FORK)
    assert_refused_then_next_round_runs(node, reply)
    assert "PermissionError" in reply.message


def test_a_plan_cannot_allocate_past_the_memory_limit(node: OneNode) -> None:
    reply = node.round(ALLOCATE)
    assert_refused_then_next_round_runs(node, reply, code="FS504")
    assert "memory limit" in reply.message


def test_a_round_on_another_dataset_sees_that_dataset_only(node: OneNode) -> None:
    assert node.round(LOGREG_PLAN, "d2").kind == "train_reply"  # the worker restarted with d2 in its view
    reply = node.round(READ, "d2", model_args={"path": str(node.data / "d1.csv")})
    assert reply.kind == "error" and reply.code == "FS500", reply
    assert node.round(LOGREG_PLAN, "d1").kind == "train_reply"


def test_what_a_round_writes_is_gone_at_the_next(node: OneNode) -> None:
    """The worker's folder (the only writable place) is emptied after each round: another researcher's
    plan finds nothing a previous one left there."""
    # The writable places, as a plan finds them: its working folder and the state exchange folder (mountinfo).
    places = """            import os
            places = ['.'] + [ln.split()[4] for ln in open('/proc/self/mountinfo') if 'fedsilo-state-' in ln]
            assert len(places) == 2, places
"""
    write = attack(places + "            for p in places:\n                open(os.path.join(p, 'left-behind'), 'w')\n")
    read = attack(places + """            found = [p for p in places if os.path.exists(os.path.join(p, 'left-behind'))]
            if found:
                raise FileExistsError(found)
""")
    approve(node.nodedir, [write, read])
    assert node.round(write).kind == "train_reply"
    assert node.round(read).kind == "train_reply"  # it found nothing (FileExistsError otherwise)


def test_a_jobs_rounds_share_a_process_that_no_other_job_sees(node: OneNode) -> None:
    def mark(job: str, seen: list[str], **extra: object) -> object:
        return node.round(MARK, job_id=job, model_args={"job": job, "seen": seen, **extra})

    assert mark("job-a", []).kind == "train_reply"
    assert mark("job-a", ["job-a"]).kind == "train_reply"  # the job's process, with what its last round left
    reply = mark("job-b", [])
    assert reply.kind == "train_reply", reply  # another job: a fresh process, no mark in it
    died = mark("job-b", ["job-b"], die=True)  # killed in its second round: answered for, not waited on forever
    assert (died.kind, died.code, died.stage) == ("error", "FS504", "training"), died
    assert "SIGKILL" in died.message
    assert mark("job-b", []).kind == "train_reply"  # the next round of the job: a fresh process


# --------------------------------------------------------------------- confinement of one process
def _in_confined_child(limits: SandboxLimits, body: str) -> int:
    """Fork; the child confines itself then runs `body`; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            confine(limits)
            exec(body)
            os._exit(0)
        except BaseException:
            os._exit(7)
    return os.waitpid(pid, 0)[1]


def test_cpu_time_limit_stops_a_spinning_round() -> None:
    limits = SandboxLimits(memory_mb=256, cpu_s=1)
    status = _in_confined_child(limits, "while True: pass")
    assert os.WIFSIGNALED(status)
    code, message = _death(status, 1.0, limits, confined=True)
    assert code == "FS504" and "CPU time limit (1 s)" in message


def test_file_size_limit_and_threads(tmp_path: Path) -> None:
    body = f"""
import threading
t = threading.Thread(target=lambda: None); t.start(); t.join()   # threads stay allowed
try:
    open({str(tmp_path / 'big')!r}, 'wb').write(b'x' * (2 * 2**20))
except OSError as exc:
    import errno
    os._exit(0 if exc.errno == errno.EFBIG else 5)
os._exit(6)
"""
    status = _in_confined_child(SandboxLimits(memory_mb=256, cpu_s=60, file_mb=1), body)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_the_view_holds_no_node_directory(tmp_path: Path) -> None:
    nodedir = tmp_path / "node"
    argv = bwrap_argv(["python"], str(tmp_path / "home"), [str(tmp_path / "d.csv")], hidden=[nodedir])
    assert not [a for a in argv if a.startswith(str(nodedir))]
    assert "--unshare-all" in argv and "--cap-drop" in argv
    assert not [p for p in python_paths([Path("/")]) if p == "/"]  # a folder that holds the node is never bound


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNode]:
    """A node whose bubblewrap fails as it does where the kernel refuses user namespaces."""
    root = tmp_path_factory.mktemp("sandbox-broken")
    fake = root / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel "
                    "does not allow non-privileged user namespaces.' >&2\nexit 1\n")  # fmt: skip
    fake.chmod(0o755)
    one = OneNode.start(root, "embedded", plans=[LOGREG_PLAN], env={"FEDSILO_BWRAP": str(fake)})
    yield one
    one.stop()


def test_a_node_that_cannot_sandbox_refuses_rounds(broken: OneNode) -> None:
    reply = broken.round(LOGREG_PLAN)
    assert reply.kind == "error" and (reply.code, reply.stage) == ("FS505", "sandbox"), reply
    assert broken.node.alive
    sandbox = broken.status()["sandbox"]
    assert sandbox["active"] is False and "user namespaces" in sandbox["detail"], sandbox
    assert broken.round(LOGREG_PLAN).code == "FS505"  # every round, until the administrator fixes it


def test_probe_says_what_it_can_enforce(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert probe("bwrap").active  # Debian's bubblewrap on this machine
    off = probe("off")
    assert not off.active and "daemon's user, files and network" in off.detail
    monkeypatch.setenv("FEDSILO_BWRAP", str(tmp_path / "missing"))
    missing = probe("bwrap")
    assert not missing.active and "not installed" in missing.detail


def test_a_medical_folder_brings_its_demographics_table(tmp_path: Path) -> None:
    table = tmp_path / "elsewhere" / "demographics.csv"
    table.parent.mkdir()
    table.write_text("id,age\n")
    record = {"path": str(tmp_path / "folder"), "options": {"demographics": str(table), "index_col": "id"}}
    assert dataset_paths(record) == [str(tmp_path / "folder"), str(table)]


@pytest.fixture(scope="module")
def unconfined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNode]:
    one = OneNode.start(tmp_path_factory.mktemp("sandbox-off"), "embedded", plans=[LOGREG_PLAN, READ],
                        node={"sandbox": "off"})  # fmt: skip
    yield one
    one.stop()


def test_sandbox_off_runs_plans_unconfined_and_says_so(unconfined: OneNode) -> None:
    """`sandbox = "off"` is the administrator's explicit choice: rounds run, plan code sees the machine."""
    assert unconfined.round(LOGREG_PLAN).kind == "train_reply"
    assert unconfined.round(READ, model_args={"path": "/etc/passwd"}).kind == "train_reply"
    sandbox = unconfined.status()["sandbox"]
    assert sandbox["mode"] == "off" and sandbox["active"] is False, sandbox
