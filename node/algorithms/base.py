"""The node-side half of a federated algorithm: hooks the node's trainer calls around its own loop.

A hook sees the plain model (never Opacus' wrapper) and the round's received tensors; it cannot replace
the loop, so the node's caps and DP stay in force whatever the algorithm. Under DP the gradient of
`loss_term` and the corrections of `after_backward` are added after Opacus has clipped and noised the
data gradient: they depend on the received global state only, so the privacy guarantee is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fedsilo.common.algorithms import AlgorithmConfig, FedAvgConfig
from fedsilo.common.errors import SerializationError
from fedsilo.common.serialization import non_finite

Params = dict[str, Tensor]
"""Named tensors (a state dict, or the trainable parameters only)."""


class NodeHooks:
    """Base hooks: plain local training (FedAvg). Subclasses override what their algorithm needs.

        hooks = make_hooks(FedProxConfig(mu=0.01), state_dir)
        trainer = Trainer(plan, args, limits, dp_policy, algorithm=config, hooks=hooks)
    """

    config_type: type[AlgorithmConfig] = FedAvgConfig

    def __init__(self, config: AlgorithmConfig, state_dir: Path | None = None) -> None:
        self.config = config
        self.state_dir = state_dir

    def before_training(self, model: nn.Module, received: Params, blobs: dict[str, Params]) -> None:
        """Called once, after the received global parameters are loaded and before the first step."""

    def loss_term(self, model: nn.Module) -> Tensor | None:
        """A term added to the plan's loss at every step (None: nothing)."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after the gradients are final (after DP's clipping and noise) and before the step."""

    def after_training(self, model: nn.Module, steps: int, lr: float) -> dict[str, Params]:
        """Extra blobs to send back with the update, by name."""
        return {}

    def commit(self) -> None:
        """The update was delivered: persist what the algorithm keeps between rounds (none here)."""


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimiser updates, under their plain names."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def matching_blob(blobs: dict[str, Params], key: str, like: dict[str, nn.Parameter]) -> Params | None:
    """`blobs[key]` checked against the trainable parameters (same names and shapes, finite), on their
    devices; None when the request carries no such blob. A mismatch is a `SerializationError` (PARAMS_INVALID)."""
    blob = blobs.get(key)
    if blob is None:
        return None
    if set(blob) != set(like):
        missing, extra = sorted(set(like) - set(blob)), sorted(set(blob) - set(like))
        raise SerializationError(f"blob '{key}' does not match the model's trainable parameters "
                                 f"(missing {missing[:5]}, unexpected {extra[:5]})")  # fmt: skip
    out: Params = {}
    for name, p in like.items():
        t = blob[name]
        if tuple(t.shape) != tuple(p.shape):
            raise SerializationError(f"blob '{key}': '{name}' has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
        out[name] = t.detach().to(device=p.device, dtype=p.dtype)
    bad = non_finite(out)
    if bad:
        raise SerializationError(f"blob '{key}' holds NaN or infinity in {', '.join(bad[:5])}")
    return out


def zeros_like(like: dict[str, nn.Parameter]) -> Params:
    return {name: torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for name, p in like.items()}
