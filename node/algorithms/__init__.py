"""Node-side algorithm hooks by name (`fedavg`, `fedprox`, `scaffold`), matching `fedsilo.common.algorithms`.

    hooks = make_hooks(request.algorithm.parse(), job_state_dir(paths.state, request.sender, request.job_id))
"""

from __future__ import annotations

import re
from pathlib import Path

from fedsilo.common.algorithms import AlgorithmConfig, AlgorithmError

from .base import NodeHooks, Params
from .fedprox import FedProxHooks
from .scaffold import ScaffoldHooks

__all__ = ["HOOKS", "FedProxHooks", "NodeHooks", "Params", "ScaffoldHooks", "job_state_dir", "make_hooks"]

HOOKS: dict[str, type[NodeHooks]] = {"fedavg": NodeHooks, "fedprox": FedProxHooks, "scaffold": ScaffoldHooks}

_PART = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def make_hooks(config: AlgorithmConfig, state_dir: Path | None = None) -> NodeHooks:
    """The hooks for a parsed algorithm config; `AlgorithmError` for a name this node does not run."""
    cls = HOOKS.get(config.name)
    if cls is None or not isinstance(config, cls.config_type):
        raise AlgorithmError(f"this node has no node-side hooks for algorithm '{config.name}'")
    return cls(config, state_dir)


def job_state_dir(root: Path, researcher: str, job_id: str) -> Path:
    """`root/<researcher>/<job_id>`: keyed by the researcher as well, because job ids are chosen by
    researchers and one must not read or overwrite another's state by reusing its job id."""
    for part in (researcher, job_id):
        if not _PART.match(part) or set(part) == {"."}:
            raise AlgorithmError(f"'{part}' cannot name a state folder")
    return root / researcher / job_id
