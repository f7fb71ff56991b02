"""FedProx (Li et al. 2020) on the node: the proximal term (mu / 2) * ||w - w_global||^2 added to the loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsilo.common.algorithms import FedProxConfig

from .base import NodeHooks, Params, trainable


class FedProxHooks(NodeHooks):
    """Keeps a detached copy of the received global weights and adds the proximal term at every step.

    Its gradient is mu * (w - w_global): with mu = 0 the update is exactly FedAvg's.
    """

    config_type = FedProxConfig

    def before_training(self, model: nn.Module, received: Params, blobs: dict[str, Params]) -> None:
        self._params = trainable(model)
        # A copy, detached: the global weights are a constant of the round, not something to differentiate.
        self._global = {name: p.detach().clone() for name, p in self._params.items()}

    def loss_term(self, model: nn.Module) -> Tensor | None:
        assert isinstance(self.config, FedProxConfig)
        squares = [torch.sum((p - self._global[name]) ** 2) for name, p in self._params.items()]
        if not squares:
            return None
        return (self.config.mu / 2.0) * torch.stack(squares).sum()
