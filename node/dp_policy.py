"""The node's DP policy applied to a researcher's arguments, and the bound a round's privacy loss is accounted at.

Torch-free: the daemon applies it before any plan code runs, and the trainer applies it again (idempotent) in
the worker. A round under DP runs with

- a noise multiplier at least `[dp] min_noise_multiplier`, a clipping norm at most `max_grad_norm`, a delta at
  most `delta`: a weaker request (or none, where DP is required) is raised to them or refused
  (`weaker_request`, `DPRequestRefused` = FS700);
- under a privacy budget, the sampling rate and step count the node accounted for (`planned_round`): the
  trainer samples batches at that rate (Poisson, as DP-SGD's analysis assumes) and may not take more steps.

    dp = effective_dp({"sigma": 0.5, "clip": 4.0}, DPPolicy(min_noise_multiplier=1.0, max_grad_norm=1.0))
    # {"type": "local", "sigma": 1.0, "clip": 1.0, "delta": 1e-05}
"""

from __future__ import annotations

import math
from typing import Any

from fedsilo.common.errors import FedsiloError
from fedsilo.common.training_args import DEFAULT_BATCH_SIZE, TrainingArgs

from .config import DPPolicy, Limits

BOUND_KEYS = ("sample_rate", "max_steps")
"""dp_args keys the node sets under a budget: the Poisson sampling rate and the steps it accounted for."""


class DPRequestRefused(FedsiloError):
    """The researcher's DP request is weaker than the node's policy and the node refuses weaker requests."""


def effective_dp(requested: dict[str, Any] | None, policy: DPPolicy, needed: bool = False) -> dict[str, Any] | None:
    """The DP arguments a round runs with, or None for no DP.

    DP runs when asked, when `policy.required`, or when `needed` (the dataset has a budget). The request is
    made at least as strong as the policy (noise floor, clipping and delta ceilings): under
    `weaker_request = "refuse"` a weaker or missing request raises `DPRequestRefused` naming what to ask.
    """
    must = needed or policy.required
    if not requested and not must:
        return None
    floor, ceiling = policy.min_noise_multiplier, policy.max_grad_norm
    want = dict(requested or {})
    if not want:
        if policy.weaker_request == "refuse":
            raise DPRequestRefused(f"this node trains this dataset only with differential privacy: ask dp_args "
                                   f"{_ask(policy)}")  # fmt: skip
        if floor is None or ceiling is None:
            raise DPRequestRefused("this dataset has a privacy budget, so its rounds need differential privacy: "
                                   "ask dp_args {'sigma': noise multiplier, 'clip': max grad norm}")  # fmt: skip
        want = {"sigma": floor, "clip": ceiling}
    applied = {
        "type": "local",
        "sigma": max(float(want["sigma"]), floor) if floor is not None else float(want["sigma"]),
        "clip": min(float(want["clip"]), ceiling) if ceiling is not None else float(want["clip"]),
        "delta": min(float(want.get("delta", policy.delta)), policy.delta),
    }
    applied.update({k: want[k] for k in BOUND_KEYS if k in want})
    weaker = weaker_fields(want, applied)
    if weaker and policy.weaker_request == "refuse":
        raise DPRequestRefused(f"dp_args weaker than this node's policy ({', '.join(weaker)}); ask {_ask(policy)}")
    return applied


def weaker_fields(requested: dict[str, Any], applied: dict[str, Any]) -> list[str]:
    """'sigma 0.5 < 1.0'-style notes for the noise or clipping the policy strengthened (for the log and a refusal).
    Delta is not among them: it changes no noise, only the epsilon reported, so it is lowered without refusing
    (a researcher who did not set it gets TrainingArgs' 1e-5)."""
    notes = []
    for key, sign in (("sigma", "<"), ("clip", ">")):
        if key in requested and float(requested[key]) != applied[key]:
            notes.append(f"{key} {requested[key]:g} {sign} {applied[key]:g}")
    return notes


def _ask(policy: DPPolicy) -> str:
    parts = []
    if policy.min_noise_multiplier is not None:
        parts.append(f"sigma >= {policy.min_noise_multiplier:g}")
    if policy.max_grad_norm is not None:
        parts.append(f"clip <= {policy.max_grad_norm:g}")
    parts.append(f"delta <= {policy.delta:g}")
    return "with " + ", ".join(parts)


def step_cap(args: TrainingArgs, limits: Limits) -> int | None:
    """The trainer's step limit: `num_updates` lowered to `[limits] max_num_updates` (which also caps a round
    in epochs), 1 for a dry run; None = the epochs decide."""
    steps = args.num_updates
    if limits.max_num_updates is not None and (steps is None or steps > limits.max_num_updates):
        steps = limits.max_num_updates
    return 1 if args.dry_run else steps


def planned_round(rows: int, args: TrainingArgs, limits: Limits) -> tuple[float, int]:
    """(Poisson sampling rate, steps) of a DP round on a dataset of `rows` samples, from the capped arguments:
    the rate is 1 / (batches per epoch), as Opacus derives it from a loader, so that an epoch is a whole number
    of expected batches; the steps follow the trainer's own limits (`step_cap`, else epochs x batches)."""
    n_test = round(rows * args.test_ratio) if args.test_ratio > 0 else 0
    n_train = rows - n_test
    if n_train < 1:
        raise DPRequestRefused(f"test_ratio {args.test_ratio} leaves no training samples out of {rows}")
    batch = args.batch_size or DEFAULT_BATCH_SIZE
    if limits.max_batch_size is not None:
        batch = min(batch, limits.max_batch_size)
    batches = math.ceil(n_train / batch)
    cap = step_cap(args, limits)
    return 1.0 / batches, cap if cap is not None else args.epochs * batches
