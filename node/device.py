"""Where a round runs: the researcher asks with `use_gpu` (Fed-BioMed's name), the node decides.

The node trains on CUDA only when the researcher asked, `[limits] allow_gpu` allows it and torch sees a
device; otherwise on the CPU. A request the node could not honour is logged on the node and reported in the
reply (`TrainReply.device` / `EvaluateReply.device`: `{used, gpu_requested, fallback}`), so a researcher
whose round ran on the CPU knows why: the node refused (`allow_gpu = false`, also in `applied_caps.use_gpu`)
or has no usable GPU.

    choice = choose_device(requested=request.training_args.use_gpu, allowed=cfg.limits.allow_gpu)
    choice.device        # torch.device("cpu") or torch.device("cuda", 0)
    choice.report()      # {"used": "cpu", "gpu_requested": True, "fallback": "..."}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REFUSED = "this node does not allow GPU use ([limits] allow_gpu = false); the round ran on the CPU"
NO_CUDA = "this node allows GPU use but torch sees no CUDA device; the round ran on the CPU"


@dataclass(frozen=True)
class DeviceChoice:
    """The device a round runs on, whether the researcher asked for a GPU, and why not one if asked.

        DeviceChoice(torch.device("cpu"), gpu_requested=True, fallback=NO_CUDA).report()["used"]   # "cpu"
    """

    device: torch.device
    gpu_requested: bool
    fallback: str = ""

    def report(self) -> dict[str, str | bool]:
        """The reply's `device` field."""
        return {"used": str(self.device), "gpu_requested": self.gpu_requested, "fallback": self.fallback}


def choose_device(requested: bool, allowed: bool) -> DeviceChoice:
    """CUDA when `requested` and `allowed` and available (the current CUDA device), else the CPU with the
    reason when a GPU was requested."""
    if not requested:
        return DeviceChoice(torch.device("cpu"), False)
    if not allowed:
        return DeviceChoice(torch.device("cpu"), True, REFUSED)
    if not torch.cuda.is_available():
        return DeviceChoice(torch.device("cpu"), True, NO_CUDA)
    return DeviceChoice(torch.device("cuda", torch.cuda.current_device()), True)
