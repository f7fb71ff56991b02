"""Experiment folders and breakpoints: JSON state + safetensors parameters + the plan source.

Layout: `<root>/Experiment_NNNN/breakpoint_NNNN/{breakpoint.json, params.safetensors, algorithm.safetensors,
plan.py}`, NNNN of a breakpoint being the number of rounds completed. `algorithm.safetensors` holds the tensor
part of the algorithm's state (FedAdam's moments, SCAFFOLD's control variate); its JSON part is
`breakpoint.json`'s `algorithm_state`. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedsilo.common.errors import FedsiloError
from fedsilo.common.hashing import key_matches
from fedsilo.common.plan_source import plan_hash
from fedsilo.common.serialization import params_from_bytes, params_to_bytes

from .rounds import write_params

FORMAT_VERSION = 3
"""2 added the algorithm's state (`algorithm.safetensors`, `algorithm_state`); a version 1 breakpoint reads with
an empty one."""
_READABLE_VERSIONS = (1, 2, 3)
STATE_FILE = "breakpoint.json"
PARAMS_FILE = "params.safetensors"
ALGORITHM_FILE = "algorithm.safetensors"
PLAN_FILE = "plan.py"
_EXPERIMENT_RE = re.compile(r"^Experiment_(\d{4,})$")
_BREAKPOINT_RE = re.compile(r"^breakpoint_(\d{4,})$")


class BreakpointError(FedsiloError):
    """A breakpoint is missing, incomplete, of another format version, or altered."""


def new_experiment_dir(root: str | Path) -> Path:
    """Create `<root>/Experiment_NNNN`, one past the highest number there (not the entry count); absolute."""
    base = Path(root).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    n = max((_number(p, _EXPERIMENT_RE) for p in base.iterdir() if p.is_dir()), default=-1) + 1
    while True:
        path = base / f"Experiment_{n:04d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took this number meanwhile
            n += 1


AlgorithmState = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""What `FedAlgorithm.state()` returns and `load_state()` takes: a JSON part and named tensors."""


class Breakpoint(NamedTuple):
    """A breakpoint as read back: each part checked against the hashes `breakpoint.json` records."""

    folder: Path
    state: dict[str, Any]
    params: dict[str, torch.Tensor]
    source: str
    algorithm_state: AlgorithmState


def save_breakpoint(
    experiment_dir: Path,
    rounds_done: int,
    state: dict[str, Any],
    params: dict[str, torch.Tensor],
    source: str,
    algorithm_state: AlgorithmState = ({}, {}),
    saved: tuple[Path, str] | None = None,
) -> Path:
    """Write a breakpoint atomically (a temporary folder renamed into place); returns its folder.

    `algorithm_state` is `algorithm.state()`: its tensors go to `algorithm.safetensors` (bit for bit, in their
    own dtypes), its JSON part to `breakpoint.json` under `algorithm_state`. `saved` is the round archive's
    file of these very parameters and its digest key (`RoundArchive.saved`): `params.safetensors` is then a
    hard link to it, the same bytes (the archive replaces a file, never rewrites one, so the link keeps them).
    """
    final = experiment_dir / f"breakpoint_{rounds_done:04d}"
    tmp = experiment_dir / f".breakpoint_{rounds_done:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta, tensors = algorithm_state
    full = {
        **state,
        "format_version": FORMAT_VERSION,
        "rounds_done": rounds_done,
        "params_digest": _linked(saved, tmp / PARAMS_FILE) or write_params(params, tmp / PARAMS_FILE),
        "plan_sha256": plan_hash(source),
        "algorithm_state": meta,
        "algorithm_digest": write_params(tensors, tmp / ALGORITHM_FILE),
    }
    (tmp / PLAN_FILE).write_text(source, encoding="utf-8", newline="")
    (tmp / STATE_FILE).write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _linked(saved: tuple[Path, str] | None, path: Path) -> str | None:
    """`path` as a hard link to the archive's file; its digest key, or None where it cannot be (no such file,
    another file system). Measured (40 MB, 2026-12-02): writing the global model the archive had just written
    again took 0.07-0.12 s of the round loop (from tensor memory, BLAKE3; more with sha256 and a joined copy, as
    before), linking it 0.3-0.7 ms; each breakpoint also no longer holds a second copy on disk."""
    if saved is None:
        return None
    try:
        os.link(saved[0], path)
    except OSError:
        return None
    return saved[1]


def find_breakpoint(path: str | Path) -> Path:
    """Resolve a breakpoint folder from itself, an experiment folder (its latest) or a root (latest of latest).

    The folder returned is absolute: a resumed experiment keeps working after a `chdir`."""
    p = Path(path).expanduser().resolve()
    if (p / STATE_FILE).is_file():
        return p
    if not p.is_dir():
        raise BreakpointError(f"{p}: no such breakpoint or experiment folder")
    breakpoints = _numbered(p, _BREAKPOINT_RE)
    if breakpoints:
        return breakpoints[-1]
    for experiment in reversed(_numbered(p, _EXPERIMENT_RE)):
        found = _numbered(experiment, _BREAKPOINT_RE)
        if found:
            return found[-1]
    raise BreakpointError(f"{p}: holds no breakpoint (save_breakpoints=True writes one after each round)")


def read_breakpoint(path: str | Path) -> Breakpoint:
    """Folder, state, global parameters, plan source and algorithm state of a breakpoint, each checked."""
    folder = find_breakpoint(path)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        version = state.get("format_version") if isinstance(state, dict) else None
        if type(version) is not int or version not in _READABLE_VERSIONS:
            raise BreakpointError(f"{folder}: breakpoint format {version!r}, this fedsilo reads {_READABLE_VERSIONS}")
        blob = (folder / PARAMS_FILE).read_bytes()
        source = (folder / PLAN_FILE).read_text(encoding="utf-8")
        algorithm_blob = (folder / ALGORITHM_FILE).read_bytes() if version >= 2 else params_to_bytes({})
    except FileNotFoundError as exc:
        raise BreakpointError(f"{folder}: incomplete breakpoint, {Path(exc.filename).name} is missing") from None
    except ValueError as exc:
        raise BreakpointError(f"{folder / STATE_FILE}: not valid JSON ({exc})") from None
    # format 3 records digest keys (BLAKE3), formats 1 and 2 bare sha256s: `key_matches` reads both
    if not key_matches(state.get("params_digest" if version >= 3 else "params_sha256"), blob):
        raise BreakpointError(f"{folder / PARAMS_FILE}: contents differ from the recorded digest")
    if plan_hash(source) != state.get("plan_sha256"):
        raise BreakpointError(f"{folder / PLAN_FILE}: contents differ from the recorded plan hash")
    if version >= 2 and not key_matches(state.get("algorithm_digest" if version >= 3 else "algorithm_sha256"),
                                        algorithm_blob):  # fmt: skip
        raise BreakpointError(f"{folder / ALGORITHM_FILE}: contents differ from the recorded digest")
    meta = state.get("algorithm_state", {})
    if not isinstance(meta, dict):
        raise BreakpointError(f"{folder / STATE_FILE}: algorithm_state is not a JSON object")
    return Breakpoint(folder, state, params_from_bytes(blob), source, (meta, params_from_bytes(algorithm_blob)))


def _number(path: Path, pattern: re.Pattern[str]) -> int:
    m = pattern.match(path.name)
    return int(m.group(1)) if m else -1


def _numbered(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and pattern.match(p.name)]
    return sorted(found, key=lambda p: _number(p, pattern))
