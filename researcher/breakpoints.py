"""Experiment folders and breakpoints: JSON state + safetensors parameters + the plan source.

Layout: `<root>/Experiment_NNNN/breakpoint_NNNN/{breakpoint.json, params.safetensors, plan.py}`,
NNNN of a breakpoint being the number of rounds completed. Nothing is pickled.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fedsilo.common.errors import FedsiloError
from fedsilo.common.hashing import sha256_bytes
from fedsilo.common.plan_source import plan_hash
from fedsilo.common.serialization import params_from_bytes, params_to_bytes

FORMAT_VERSION = 1
STATE_FILE = "breakpoint.json"
PARAMS_FILE = "params.safetensors"
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


def save_breakpoint(
    experiment_dir: Path, rounds_done: int, state: dict[str, Any], params: dict[str, torch.Tensor], source: str
) -> Path:
    """Write a breakpoint atomically (a temporary folder renamed into place); returns its folder."""
    final = experiment_dir / f"breakpoint_{rounds_done:04d}"
    tmp = experiment_dir / f".breakpoint_{rounds_done:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    blob = params_to_bytes(params)
    full = {
        **state,
        "format_version": FORMAT_VERSION,
        "rounds_done": rounds_done,
        "params_sha256": sha256_bytes(blob),
        "plan_sha256": plan_hash(source),
    }
    (tmp / PARAMS_FILE).write_bytes(blob)
    (tmp / PLAN_FILE).write_text(source, encoding="utf-8", newline="")
    (tmp / STATE_FILE).write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


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


def read_breakpoint(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], str]:
    """Folder, state, global parameters and plan source of a breakpoint, each checked against the state."""
    folder = find_breakpoint(path)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        blob = (folder / PARAMS_FILE).read_bytes()
        source = (folder / PLAN_FILE).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise BreakpointError(f"{folder}: incomplete breakpoint, {Path(exc.filename).name} is missing") from None
    except ValueError as exc:
        raise BreakpointError(f"{folder / STATE_FILE}: not valid JSON ({exc})") from None
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise BreakpointError(f"{folder}: breakpoint format {version!r}, this fedsilo reads {FORMAT_VERSION}")
    if sha256_bytes(blob) != state.get("params_sha256"):
        raise BreakpointError(f"{folder / PARAMS_FILE}: contents differ from the recorded sha256")
    if plan_hash(source) != state.get("plan_sha256"):
        raise BreakpointError(f"{folder / PLAN_FILE}: contents differ from the recorded plan hash")
    return folder, state, params_from_bytes(blob), source


def _number(path: Path, pattern: re.Pattern[str]) -> int:
    m = pattern.match(path.name)
    return int(m.group(1)) if m else -1


def _numbered(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and pattern.match(p.name)]
    return sorted(found, key=lambda p: _number(p, pattern))
