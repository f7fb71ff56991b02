"""SCAFFOLD (Karimireddy et al. 2020), option II, on the node.

Every step's gradient is corrected by c - c_i (c: the server's control variate, sent as blob "control";
c_i: this node's, kept per experiment). After K local steps at learning rate lr:
    c_i+ = c_i - c + (x - y_i) / (K * lr)        (x: the received global model, y_i: the local one)
and the node returns blob "control_delta" = c_i+ - c_i. c_i+ is written to
`state/<researcher>/<job_id>/scaffold.safetensors` only once the update is delivered (`commit`), so a
round that fails after training does not move c_i without the server hearing of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from fedsilo.common.algorithms import ScaffoldConfig

from ..personal import save_tensors_atomic
from .base import NodeHooks, Params, matching_blob, trainable, zeros_like

log = logging.getLogger("fedsilo.node.algorithms.scaffold")

STATE_FILE = "scaffold.safetensors"


class ScaffoldHooks(NodeHooks):
    """Control-variate correction of the gradient, and the node's variate c_i persisted between rounds."""

    config_type = ScaffoldConfig

    def before_training(self, model: nn.Module, received: Params, blobs: dict[str, Params]) -> None:
        self._params = trainable(model)
        self._x = {name: p.detach().clone() for name, p in self._params.items()}
        c = matching_blob(blobs, "control", self._params)
        self._c = c if c is not None else zeros_like(self._params)  # the server's c starts at zero
        self._c_i = self._load_c_i()
        self._correction = {name: self._c[name] - self._c_i[name] for name in self._params}
        self._staged: Params | None = None

    def after_backward(self, model: nn.Module) -> None:
        for name, p in self._params.items():
            if p.grad is not None:
                p.grad.add_(self._correction[name])

    def after_training(self, model: nn.Module, steps: int, lr: float) -> dict[str, Params]:
        if steps == 0 or lr <= 0:
            new = {name: t.clone() for name, t in self._c_i.items()}
        else:
            scale = 1.0 / (steps * lr)
            new = {
                name: self._c_i[name] - self._c[name] + (self._x[name] - p.detach()) * scale
                for name, p in self._params.items()
            }
        self._staged = new
        return {"control_delta": {name: (new[name] - self._c_i[name]).cpu() for name in new}}

    def commit(self) -> None:
        if self._staged is None or self.state_dir is None:
            return
        save_tensors_atomic(self.state_dir / STATE_FILE, self._staged)  # a crash leaves the previous c_i
        self._staged = None

    def _load_c_i(self) -> Params:
        path = self.state_dir / STATE_FILE if self.state_dir is not None else None
        if path is None or not path.is_file():
            return zeros_like(self._params)
        try:
            return matching_blob({"c_i": load_file(str(path))}, "c_i", self._params) or zeros_like(self._params)
        except Exception as exc:  # the plan's model changed within the experiment, or the file is damaged
            log.warning("SCAFFOLD state %s not usable (%s); starting c_i from zero", path, exc)
            return zeros_like(self._params)


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE
