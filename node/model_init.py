"""The plan's model built without its random initialisation, where the received global model replaces all of it.

Each round a node builds the plan's model (`init_model`, Fed-BioMed's contract) and then loads the researcher's
global model over every parameter and buffer, so the random numbers the initialisers drew are thrown away.
Measured (2026-12-02, 2-core VM, one thread): building the peerbench large model (10.1 M parameters) took
42-72 ms of a worker's CPU, most of it `nn.Linear`'s `kaiming_uniform_` drawing a number per weight; with the
initialisers filling zeros instead, 2.4-24 ms. A machine-wide perf of K=10 large rounds had torch's uniform
kernel and its generator at 4.1 % of all the CPU.

While the plan's model is built, `torch.nn.init`'s in-place initialisers fill zeros (as Hugging Face's
`no_init_weights` makes them do nothing): what they would have drawn is zero, never uninitialised memory. A
module that imported an initialiser by name (torch's `MultiheadAttention`) still draws: slower, never wrong.
What no check can see: a plan that keeps something computed from its initial weights outside the state dict
(a plain tensor attribute) gets it from zeros; such a value was random before, and a plan that needs it should
compute it from the received model in `training_step`.
The build is kept only when the received parameters name every entry of the model's state dict and the model
has no buffer outside it (a non-persistent buffer is never received); otherwise, or when the plan fails to
build that way, it is built again as usual from the random state the first build started from, so that the
result is what it would have been without this. The random state after a kept build differs from a usual
build's (the initialisers drew nothing): a round's training, seeded by `random_seed` or not, draws its own.

    plan, skipped = build_replacing(build, lambda p: p.model(), received.keys())
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

log = logging.getLogger("fedsilo.node.model_init")

T = TypeVar("T")

INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                "sparse_")  # fmt: skip
"""`torch.nn.init`'s in-place initialisers: what torch's layers call from `reset_parameters`."""


def _zero_fill(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return tensor.zero_()


@contextmanager
def zero_initialisers() -> Iterator[None]:
    """`torch.nn.init`'s initialisers fill zeros inside the block; they are themselves again after it, however
    it ends. For this process's only thread that builds models (the round's)."""
    saved = {name: getattr(nn.init, name) for name in INITIALISERS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _zero_fill)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def replaced_by(model: nn.Module, received: Collection[str]) -> bool:
    """Whether loading `received` (parameter names) sets everything in `model` that an initialiser may have set:
    every entry of its state dict is received, and it has no buffer outside its state dict."""
    state = model.state_dict().keys()
    names = set(received)
    return all(key in names for key in state) and all(name in state for name, _ in model.named_buffers())


def build_replacing(
    build: Callable[[], T], model_of: Callable[[T], nn.Module], received: Collection[str]
) -> tuple[T, bool]:
    """`build()` with zero-filling initialisers, kept when the received names replace all of `model_of(built)`;
    else `build()` again as usual from the same random state. Returns (what was built, whether it was kept)."""
    state = _random_state()
    try:
        with zero_initialisers():
            built = build()
        if replaced_by(model_of(built), received):
            return built, True
    except Exception as exc:  # the usual build below raises what the plan gets wrong, if it still fails
        log.debug("the plan's model built without its initialisers failed (%s); building it as usual", exc)
    _set_random_state(state)
    return build(), False


def _random_state() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_random_state(state: tuple[Any, ...]) -> None:
    python, numpy, cpu, cuda = state
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
