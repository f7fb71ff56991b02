"""Node-side algorithm hooks by name (`fedavg`, `fedprox`, `scaffold`), matching `fedsilo.common.algorithms`.

    hooks = make_hooks(request.algorithm.parse(), job_state_dir(paths.state, request.sender, request.job_id))
"""

from __future__ import annotations

from pathlib import Path

from fedsilo.common.algorithms import AlgorithmConfig, AlgorithmError

from ..job_state import job_state_dir
from .base import NodeHooks, Params
from .fedprox import FedProxHooks
from .scaffold import ScaffoldHooks

__all__ = ["HOOKS", "FedProxHooks", "NodeHooks", "Params", "ScaffoldHooks", "job_state_dir", "make_hooks"]

HOOKS: dict[str, type[NodeHooks]] = {"fedavg": NodeHooks, "fedprox": FedProxHooks, "scaffold": ScaffoldHooks}


def make_hooks(config: AlgorithmConfig, state_dir: Path | None = None) -> NodeHooks:
    """The hooks for a parsed algorithm config; `AlgorithmError` for a name this node does not run."""
    cls = HOOKS.get(config.name)
    if cls is None or not isinstance(config, cls.config_type):
        raise AlgorithmError(f"this node has no node-side hooks for algorithm '{config.name}'")
    return cls(config, state_dir)

