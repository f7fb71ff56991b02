"""Personalised layers on the node: a plan's `local_parameters` never leave it, and persist per experiment.

A round receives the shared parameters only; the node loads its own local ones from
`state/<researcher>/<job_id>/local.safetensors` (the plan's fresh initialisation the first time), trains
the whole model, uploads the shared part and keeps the local part, written only once the upload
succeeded (a failed round leaves the previous local layers, as SCAFFOLD's c_i).

    layers = LocalLayers(plan, state_dir)
    layers.restore()                      # before training
    shared = layers.split(trained_params) # after training: what may be uploaded
    layers.commit()                       # after the upload succeeded
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedsilo.common.training_plan import TorchTrainingPlan

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
LOCAL_FILE = "local.safetensors"


def save_tensors_atomic(path: Path, tensors: Params) -> None:
    """Write safetensors so that a crash leaves the previous file, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class LocalLayers:
    """A plan's local parameters for one experiment on this node (see the module docstring)."""

    def __init__(self, plan: TorchTrainingPlan, state_dir: Path | None) -> None:
        self.plan = plan
        self.path = state_dir / LOCAL_FILE if state_dir is not None else None
        self._staged: Params | None = None

    @property
    def active(self) -> bool:
        return bool(self.plan.local_parameters)

    def restore(self) -> bool:
        """Load the kept local parameters into the plan; False when there are none yet (or unusable)."""
        if not self.active or self.path is None or not self.path.is_file():
            return False
        expected = self.plan.local_state()
        try:
            kept = load_file(str(self.path))
        except Exception as exc:  # a damaged file: start again from the plan's initialisation
            log.warning("local layers %s not readable (%s); starting them afresh", self.path, exc)
            return False
        if kept.keys() != expected.keys() or any(kept[k].shape != expected[k].shape for k in kept):
            log.warning("local layers %s do not fit the plan's model any more; starting them afresh", self.path)
            return False
        self.plan._plain_model().load_state_dict(kept, strict=False)
        return True

    def split(self, params: Params) -> Params:
        """The shared part of `params` (to upload); the local part is staged for `commit`."""
        if not self.active:
            return params
        self._staged = {k: v for k, v in params.items() if self.plan.is_local(k)}
        return {k: v for k, v in params.items() if not self.plan.is_local(k)}

    def commit(self) -> None:
        if self._staged is not None and self.path is not None:
            save_tensors_atomic(self.path, self._staged)
        self._staged = None
