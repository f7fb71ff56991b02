"""What a round's process applies to itself before plan code runs: resource limits and no new processes.

The worker (`worker_process.py`) forks one child per round; the child calls `confine(...)` first:

    confine(SandboxLimits(memory_mb=4096, cpu_s=3600, file_mb=1024))   # then plan code runs

- memory: `RLIMIT_AS` = the address space the child inherited plus `memory_mb` (the warm worker maps
  0.7 GB of address space: VmSize 713 MB here after torch's import and warm-up; the budget is what plan code
  may add; none with `[limits] allow_gpu`, as CUDA reserves far more address space than it uses). An
  allocation past it fails with MemoryError/RuntimeError in the plan; nothing else on the machine is touched.
- CPU time: `RLIMIT_CPU` (hard = soft + 5 s): SIGXCPU ends the child at the soft limit, SIGKILL at the
  hard one. A fresh child per round starts at zero: a long-lived process could not have its hard limit
  raised again for the next round.
- file size: `RLIMIT_FSIZE` (a bigger write fails with EFBIG: SIGXFSZ is ignored); core dumps off.
- processes: a seccomp filter answers EPERM to fork, vfork and clone without CLONE_THREAD (threads
  stay allowed; they are bounded by the memory limit through their stacks), and ENOSYS to clone3, whose
  flags a filter cannot read (glibc then falls back to clone). RLIMIT_NPROC alone is no limit here:
  the kernel exempts uid 0 (the daemon's user on many hosts, and the sandbox user of a root daemon), and
  for other users it counts every process of that user on the machine.
- `PR_SET_NO_NEW_PRIVS`: nothing the child executes gains privileges (and seccomp requires it).

Linux only; `confine` raises `OSError` when the kernel refuses the filter, so the round fails instead of
running unconfined.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import resource
import signal
import struct
from dataclasses import dataclass

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
CLONE_THREAD = 0x10000

_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL = 0x7FFF0000, 0x80000000


def _errno(code: int) -> int:
    return 0x00050000 | code


# (AUDIT_ARCH, syscalls that start a process, clone, clone3) by machine. x32 syscalls (nr >= 0x40000000)
# are refused on x86_64, and any other ABI (i386 through int 0x80) kills the process: a filter checks one ABI.
_ARCHES = {
    "x86_64": (0xC000003E, (57, 58), 56, 435),  # fork, vfork; clone; clone3
    "aarch64": (0xC00000B7, (), 220, 435),
}


@dataclass(frozen=True)
class SandboxLimits:
    """The per-round budget of plan code (from `[limits]` in config.toml).

    >>> SandboxLimits(memory_mb=512, cpu_s=60, file_mb=64).memory_mb
    512
    """

    memory_mb: int | None = 4096
    """None: no address-space limit (CUDA reserves tens of GB of address space: a GPU node's rounds go without)."""
    cpu_s: int = 3600
    file_mb: int = 1024


def no_fork_filter(machine: str | None = None) -> bytes:
    """The classic-BPF seccomp program (bytes of `struct sock_filter`) that refuses new processes."""
    machine = machine or platform.machine()
    arch, forks, clone, clone3 = _ARCHES[machine]
    allow, deny, nosys = "allow", "deny", "nosys"
    checks: list[tuple[int, int, str]] = [(_JGE, 0x40000000, deny)] if machine == "x86_64" else []
    checks += [(_JEQ, nr, deny) for nr in forks] + [(_JEQ, clone3, nosys)]
    n = len(checks)
    # Layout after the arch check: the checks, `jeq clone`, `ld args[0]`, `jset CLONE_THREAD`, then the
    # three returns; a jump offset counts the instructions it skips.
    ret = {allow: n + 3, deny: n + 4, nosys: n + 5}
    body = [(op, ret[target] - i - 1, 0, k) for i, (op, k, target) in enumerate(checks)]
    body.append((_JEQ, 0, ret[allow] - n - 1, clone))  # clone: look at its flags; any other syscall: allow
    body.append((_LD_ABS, 0, 0, 16))  # args[0], its low 32 bits (little-endian)
    body.append((_JSET, ret[allow] - n - 3, ret[deny] - n - 3, CLONE_THREAD))  # a thread: allow; else deny
    body += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _errno(errno.EPERM)), (_RET, 0, 0, _errno(errno.ENOSYS))]
    head = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL), (_LD_ABS, 0, 0, 0)]
    return b"".join(struct.pack("HBBI", *ins) for ins in head + body)


def confine(limits: SandboxLimits) -> None:
    """Apply `limits` to this process and forbid new processes; irreversible. Call after fork, before
    plan code."""
    libc = ctypes.CDLL(None, use_errno=True)
    if limits.memory_mb is not None:
        _set(resource.RLIMIT_AS, _address_space() + limits.memory_mb * 2**20)
    _set(resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 5)
    _set(resource.RLIMIT_FSIZE, limits.file_mb * 2**20)
    _set(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    program = no_fork_filter()
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed: the kernel refused the process filter")


def _set(which: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit (never raise it: an administrator's tighter limit stays)."""
    _, cur_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
    resource.setrlimit(which, (min(soft, hard), hard))


def _address_space() -> int:
    """This process's mapped address space in bytes (VmSize)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
