"""The worker's sandbox: bubblewrap's view of the machine for the process that runs plan code.

`[node] sandbox = "bwrap"` (the default) starts the worker as

    bwrap --unshare-all --cap-drop ALL --die-with-parent --new-session \\
          --ro-bind /usr ... (Python, the venv, fedsilo's own folders: read-only)
          --ro-bind DATASET DATASET (the round's dataset: read-only)
          --bind HOME HOME (the scratch folder, the only writable one)  -- python -m fedsilo.node.worker_process

so plan code has no network (a private network namespace: not even loopback to the broker), no
capability, and sees no node directory (credentials, db, logs, other datasets), no /home and no /etc
beyond the dynamic loader's cache and the time zone. Inside, each round runs in a child forked from
the warm worker that first confines itself (`sandbox_limits.confine`: memory, CPU time, file size, no
new processes). `sandbox = "off"` runs the worker as before (the daemon's user, files and network).

    state = probe("bwrap")          # SandboxState(mode="bwrap", active=True, detail="bubblewrap 0.8.0 ...")
    argv = bwrap_argv(worker_argv, home=..., datasets=[...], hidden=[nodedir])

The dataset is bound when the worker starts, so a worker serves one dataset: a round on another
dataset restarts it (`worker.Worker.run`). Measured by `bench/sandbox_cost.py` on the shared 2-core dev
machine (2026-11-30, two sittings at load 9-12 from other suites, 8 runs each): bwrap adds 25-35 ms to a
Python start (`python -c pass`: medians 143 and 205 ms in the sandbox, 118 and 171 ms without); the
per-round fork, confinement and exit: medians 54 and 128 ms. A worker's start to ready (torch's import
and warm-up) took 8-15 s in the sandbox and 13-19 s without at load 9-15, the noise hiding bwrap's share.
A node serving rounds on two datasets in turn pays a worker start per switch; one experiment's rounds on
one dataset pay it once (the daemon's first worker binds the most recently added dataset). Binding every registered
dataset into one worker would save that but let a plan read the other datasets, which the sandbox exists
to prevent; hiding them again per round needs mounts in a nested user namespace (not done).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BWRAP = "/usr/bin/bwrap"
"""Debian's bubblewrap (not setuid: it relies on unprivileged user namespaces, or on root); the daemon's
`FEDSILO_BWRAP` names another binary (a site's own build, or a test's stand-in that fails)."""

ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
"""All of /etc the worker sees: the loader's cache (shared libraries load without a directory search)."""
_USER_ENV = ("--setenv", "USER", "fedsilo-worker", "--setenv", "LOGNAME", "fedsilo-worker")
"""getpass.getuser() reads these before /etc/passwd, which the sandbox hides: `import monai` calls it and
raised KeyError('getpwuid(): uid not found') in every MONAI plan."""

ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Merged-/usr links (Debian 12: /lib -> usr/lib), recreated as links; a real folder is bound read-only."""

PACKAGES = ("fedsilo.common", "fedsilo.network", "fedsilo.node")
"""fedsilo's folders the worker imports from (an editable install maps each to its own source folder)."""


@dataclass(frozen=True)
class SandboxState:
    """What the node can enforce, shown in status.json and on the GUI's status page.

    >>> probe("off").as_status()["active"]
    False
    """

    mode: str
    active: bool
    detail: str

    def as_status(self) -> dict[str, Any]:
        return {"mode": self.mode, "active": self.active, "detail": self.detail}


def probe(mode: str) -> SandboxState:
    """Whether `mode` can be enforced here: for bwrap, a sandbox with every namespace is started once
    (bwrap missing, or user namespaces refused by the kernel, make this inactive)."""
    if mode == "off":
        return SandboxState("off", False, 'sandbox = "off" in config.toml: plan code runs with the daemon\'s '
                            "user, files and network")  # fmt: skip
    path = _bwrap()
    if path is None:
        return SandboxState(mode, False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    try:
        done = subprocess.run([path, "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--ro-bind", "/", "/",
                               "true"], capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return SandboxState(mode, False, f"bwrap did not run: {exc}")
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        return SandboxState(mode, False, f"bwrap cannot create its namespaces ({reason}); enable unprivileged "
                            "user namespaces (sysctl kernel.unprivileged_userns_clone=1) or set "
                            'sandbox = "off"')  # fmt: skip
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return SandboxState(mode, True, f"{version or 'bubblewrap'}: no network, read-only view of Python and the "
                        "round's dataset, memory/CPU/file/process limits per round")  # fmt: skip


def dataset_paths(record: Mapping[str, Any]) -> list[str]:
    """The files a dataset's record names: its `path`, and absolute paths among its `options` and
    `dataset_parameters` (a medical folder's demographics table may live outside its folder)."""
    paths = [str(record["path"])] if record.get("path") else []
    for key in ("options", "dataset_parameters"):
        extra = record.get(key)
        if isinstance(extra, Mapping):
            paths += [v for v in extra.values() if isinstance(v, str) and v.startswith("/") and os.path.exists(v)]
    return paths


def python_paths(hidden: Iterable[Path] = ()) -> list[str]:
    """Folders Python needs: its installation, the environment (site-packages) and fedsilo's own folders; one
    that holds a `hidden` folder (the node directory) is left out. Other `sys.path` entries (PYTHONPATH) are
    not bound: a checkout on PYTHONPATH may hold other nodes' directories (the quickstart's run/)."""
    found: list[str] = [sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))]
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            found += list(spec.submodule_search_locations)
    keep: list[str] = []
    hidden_real = [os.path.realpath(h) for h in hidden]
    for path in found:
        real = os.path.realpath(path)
        if real.startswith("/usr/") or real == "/usr":
            continue  # bound as a whole
        if any(h == real or h.startswith(real.rstrip("/") + "/") for h in hidden_real):
            continue  # e.g. PYTHONPATH=/work/main while the node lives in /work/main/run/...
        if real not in keep:
            keep.append(real)
    return _outermost(keep)


def bwrap_argv(command: Sequence[str], home: str, datasets: Sequence[str], hidden: Iterable[Path] = (),
               writable: Sequence[str] = (), gpu: bool = False) -> list[str]:  # fmt: skip
    """The bwrap command line that runs `command` in the sandbox (see the module's docstring): `home` is its
    working folder, `datasets` are read-only, `writable` folders (the daemon's exchange folder) read-write;
    `gpu` (`[limits] allow_gpu`) adds NVIDIA's device nodes and a read-only /sys, which CUDA reads."""
    argv = [_bwrap() or BWRAP, "--unshare-all", "--cap-drop", "ALL", "--die-with-parent",
            "--new-session", "--ro-bind", "/usr", "/usr"]  # fmt: skip
    for link in ROOT_LINKS:
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    for path in python_paths(hidden):
        argv += ["--ro-bind", path, path]
    for path in ETC_FILES:
        argv += ["--ro-bind-try", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if gpu:
        for device in [*sorted(glob.glob("/dev/nvidia*")), "/dev/dri"]:
            argv += ["--dev-bind-try", device, device]
        argv += ["--ro-bind-try", "/sys", "/sys"]
    for path in datasets:  # the recorded path, backed by the file it resolves to (links are not followed inside)
        argv += ["--ro-bind", os.path.realpath(path), os.path.abspath(path)]
    for path in [home, *writable]:
        argv += ["--bind", path, path]
    # Nothing else is writable: not the sandbox's root, /tmp or /dev/shm, which would outlive a round and
    # hand what one plan wrote to the next researcher's; the worker empties `home` after each round.
    argv += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", home, "--setenv", "HOME", home,
             "--setenv", "TMPDIR", home, *_USER_ENV, "--"]  # fmt: skip
    return argv + list(command)


def _bwrap() -> str | None:
    """The bwrap binary: `$FEDSILO_BWRAP` when set (None when it is not executable), else bwrap on PATH."""
    chosen = os.environ.get("FEDSILO_BWRAP")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("bwrap") or (BWRAP if os.access(BWRAP, os.X_OK) else None)


def _outermost(paths: list[str]) -> list[str]:
    """`paths` without those inside another of them (one bind covers both)."""
    ordered = sorted(paths, key=len)
    kept: list[str] = []
    for path in ordered:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept
