"""Output protections: what the daemon checks and changes in an update before it leaves the node.

They run in the daemon, which never executes plan code, after the worker returned and before the
upload, so they hold whatever the plan did inside the worker (its own loop, a patched trainer):

- every blob parses as safetensors and is finite; `params` has the received global model's names,
  shapes and dtypes (`UpdateRefused` = PARAMS_INVALID, `NonFiniteError` = NON_FINITE);
- local DP on the update, as Flower's `LocalDpMod`, when `[dp] update_clip` is set: the L2 norm of
  (update - received), over every floating-point tensor together, is clipped to `update_clip`, then
  Gaussian noise of std `update_noise * update_clip` is added to each floating-point entry.

    protected = protect_update(worker_blobs, received, cfg.dp)
    protected.blobs, protected.applied     # bytes to upload; what to report in `applied_caps`

All of it runs on numpy arrays (`common/arrays.py`): the daemon imports no torch. The noise comes from
numpy's PCG64 seeded with 128 bits from `secrets` (the OS), never from anything the plan could set.

Measured (bench/daemon_stages.py, 10.1 M float32 parameters, best of 7, shared 2-core machine at load 2.2-3.1,
2026-11-30), torch (2 threads) before -> numpy: the checks 0.001 -> 0.003 s (views, sums), with clipping
0.27-0.71 -> 0.12-0.20 s, with clipping and noise 0.54-0.62 -> 0.26-0.32 s (numpy's Gaussian draws beat torch's,
and the float64 pass is done in place); in a K=3 large round (bench/round_profile.py) `protect` 0.040 -> 0.020 s.

With clipping or noise on, a reply may carry `params` only: an algorithm's other blobs (SCAFFOLD's
`control_delta`) are computed from the unclipped update and would let it through.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsilo.common.arrays import (
    arrays_from_bytes,
    arrays_to_bytes,
    check_compatible,
    is_float,
    narrow,
    non_finite,
)
from fedsilo.common.errors import NonFiniteError, SerializationError, UpdateRefused

from .config import DPPolicy

Params = dict[str, np.ndarray]


@dataclass
class ProtectedUpdate:
    """The blobs to upload (safetensors bytes) and what the protections did, for `applied_caps`.

        ProtectedUpdate({"params": data}, {"update_clip": {...}})
    """

    blobs: dict[str, bytes]
    applied: dict[str, Any] = field(default_factory=dict)


def protect_update(blobs: dict[str, Any], received: Params, policy: DPPolicy,
                   generator: np.random.Generator | None = None) -> ProtectedUpdate:  # fmt: skip
    """Check the worker's blobs against the received global parameters (arrays), then clip and noise `params`
    as `policy` says. `generator` is for tests; by default the noise is seeded from the OS, never from
    anything the plan could set (it seeds torch inside the worker)."""
    parsed = {name: _parse(name, data) for name, data in blobs.items()}
    if "params" not in parsed:
        raise UpdateRefused("the worker returned no 'params' blob")
    try:
        check_compatible(parsed["params"], received)
    except SerializationError as exc:
        raise UpdateRefused(f"the update does not fit the received model: {exc}") from None
    for name, tensors in parsed.items():
        bad = non_finite(tensors)
        if bad:
            raise NonFiniteError(f"the update's blob '{name}' holds NaN or infinity in {', '.join(bad[:5])}: "
                                 "refused before upload")  # fmt: skip
    if policy.update_clip is None:
        return ProtectedUpdate(dict(blobs))
    extra = sorted(set(parsed) - {"params"})
    if extra:
        raise UpdateRefused(f"this node clips and noises updates ([dp] update_clip), and blobs {extra} are "
                            "derived from the unprotected update: use an algorithm that returns params only")
    params, applied = clip_and_noise(parsed["params"], received, policy.update_clip, policy.update_noise or 0.0,
                                     generator)  # fmt: skip
    return ProtectedUpdate({"params": arrays_to_bytes(params)}, applied)


def clip_and_noise(update: Params, received: Params, clip: float, multiplier: float,
                   generator: np.random.Generator | None = None) -> tuple[Params, dict[str, Any]]:  # fmt: skip
    """`received + min(1, clip / ||update - received||) * (update - received) + N(0, (multiplier * clip)^2)`
    on every floating-point array (integer buffers such as BatchNorm's counter pass unchanged); and what
    was applied. Computed in float64, returned in each array's own dtype (rounded as torch's `.to` rounds)."""
    floats = [name for name, t in update.items() if is_float(t)]
    deltas = {}
    for name in floats:  # in place from the first copy: one float64 array per tensor
        delta = update[name].astype(np.float64)
        delta -= received[name].astype(np.float64)
        deltas[name] = delta
    norm = l2_norm(list(deltas.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = multiplier * clip
    if generator is None and std > 0:
        generator = np.random.default_rng(secrets.randbits(128))
    out = dict(update)
    for name, new in deltas.items():
        new *= scale
        new += received[name]  # float64 += any float dtype: numpy widens each entry exactly
        if std > 0:
            assert generator is not None
            new += generator.standard_normal(new.shape) * std
        out[name] = narrow(new, update[name].dtype)
    applied: dict[str, Any] = {
        "update_clip": {"requested": None, "applied": clip, "norm": norm, "clipped": scale < 1.0}}  # fmt: skip
    if std > 0:
        applied["update_noise"] = {"requested": None, "applied": multiplier, "std": std}
    return out, applied


def l2_norm(arrays: list[np.ndarray]) -> float:
    """The L2 norm of float64 arrays together: one dot product each (BLAS), and where squares pass float64's
    range (entries beyond 1e154, a float64 model's), the norm of each array scaled by its peak instead."""
    with np.errstate(over="ignore"):
        total = sum(float(np.dot(d.reshape(-1), d.reshape(-1))) for d in arrays)
    if math.isfinite(total):
        return math.sqrt(total)
    peaks = [float(np.abs(d).max()) if d.size else 0.0 for d in arrays]
    return math.hypot(*(p * float(np.linalg.norm((d / p).reshape(-1))) for d, p in zip(arrays, peaks, strict=True)
                        if p > 0))  # fmt: skip


def _parse(name: str, data: bytes) -> Params:
    try:
        return arrays_from_bytes(data, copy=False)  # views into the worker's frame, which the daemon owns
    except SerializationError as exc:
        raise UpdateRefused(f"the update's blob '{name}' is not safetensors: {exc}") from None
