"""The daemon's output protections (node/protection.py) on numbers, and the daemon-worker frames. The daemon
holds numpy arrays (it imports no torch): the tests build updates with torch and hand over their arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsilo.common.errors import NonFiniteError, UpdateRefused, WorkerProtocolError
from fedsilo.common.serialization import params_from_bytes, params_to_bytes, to_numpy
from fedsilo.node.config import DPPolicy
from fedsilo.node.protection import clip_and_noise, protect_update
from fedsilo.node.workerwire import decode, encode

GLOBAL = {"w": torch.ones(3, 4), "b": torch.zeros(4), "count": torch.tensor(7)}


def _np(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in params.items()}


RECEIVED = _np(GLOBAL)


def _update(delta: float) -> dict[str, torch.Tensor]:
    return {"w": GLOBAL["w"] + delta, "b": GLOBAL["b"] + delta, "count": torch.tensor(9)}


def _norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((update[k].double() - GLOBAL[k].double()).pow(2).sum()) for k in ("w", "b")))


def test_off_by_default_passes_the_bytes_unchanged() -> None:
    blob = params_to_bytes(_update(0.5))
    out = protect_update({"params": blob}, RECEIVED, DPPolicy())
    assert out.blobs == {"params": blob} and out.applied == {}


def test_clip_brings_the_update_norm_to_the_clip_and_reports_it() -> None:
    update = _update(0.5)  # 16 entries of 0.5: norm 2
    assert _norm(update) == pytest.approx(2.0)
    out = protect_update({"params": params_to_bytes(update)}, RECEIVED, DPPolicy(update_clip=0.5))
    clipped = params_from_bytes(out.blobs["params"])
    assert _norm(clipped) == pytest.approx(0.5, rel=1e-6)
    # the direction is kept: every entry moved by the same fraction (0.5 / 2)
    assert torch.allclose(clipped["w"] - GLOBAL["w"], torch.full((3, 4), 0.125))
    assert torch.equal(clipped["count"], torch.tensor(9))  # an integer buffer is neither clipped nor noised
    assert out.applied == {"update_clip": {"requested": None, "applied": 0.5, "norm": pytest.approx(2.0),
                                           "clipped": True}}  # fmt: skip


def test_an_update_within_the_clip_is_unchanged() -> None:
    update = _update(0.01)
    out, applied = clip_and_noise(_np(update), RECEIVED, clip=1.0, multiplier=0.0)
    assert all(np.array_equal(out[k], update[k].numpy()) for k in update)
    assert applied["update_clip"]["clipped"] is False


def test_noise_std_is_the_multiplier_times_the_clip() -> None:
    big = {"w": np.zeros(400_000, np.float32)}
    out, applied = clip_and_noise(big, big, clip=2.0, multiplier=0.25, generator=np.random.default_rng(1))
    noise = out["w"].astype(np.float64)
    assert float(noise.std()) == pytest.approx(0.5, rel=0.01)  # 0.25 * 2.0; 400k draws: std error 0.1 %
    assert abs(float(noise.mean())) < 0.005
    assert applied["update_noise"] == {"requested": None, "applied": 0.25, "std": 0.5}


def test_noise_is_drawn_from_the_os_not_from_torch_seeds() -> None:
    big = {"w": np.zeros(1000, np.float32)}
    torch.manual_seed(0)
    np.random.seed(0)
    first, _ = clip_and_noise(big, big, clip=1.0, multiplier=1.0)
    torch.manual_seed(0)  # a plan seeding torch or numpy cannot predict (and cancel) the noise
    np.random.seed(0)
    second, _ = clip_and_noise(big, big, clip=1.0, multiplier=1.0)
    assert not np.array_equal(first["w"], second["w"])


def test_clip_and_noise_together() -> None:
    update = {"w": np.full((100_000,), 0.1, np.float32)}  # norm 31.6
    out, applied = clip_and_noise(update, {"w": np.zeros(100_000, np.float32)}, clip=1.0, multiplier=0.1,
                                  generator=np.random.default_rng(2))  # fmt: skip
    residual = out["w"].astype(np.float64) - 1.0 / math.sqrt(100_000)  # clipped value of every entry
    assert float(residual.std()) == pytest.approx(0.1, rel=0.02)
    assert applied["update_clip"]["clipped"] and applied["update_noise"]["std"] == pytest.approx(0.1)


def test_non_finite_update_is_refused() -> None:
    update = _update(0.1)
    update["w"][1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="'params' holds NaN or infinity in w"):
        protect_update({"params": params_to_bytes(update)}, RECEIVED, DPPolicy())
    extra = {"params": params_to_bytes(_update(0.1)), "control_delta": params_to_bytes({"w": torch.tensor([math.inf])})}
    with pytest.raises(NonFiniteError, match="control_delta"):
        protect_update(extra, RECEIVED, DPPolicy())


@pytest.mark.parametrize("update, match", [
    ({"w": torch.ones(3, 4), "b": torch.zeros(4)}, "missing"),
    ({"w": torch.ones(4, 3), "b": torch.zeros(4), "count": torch.tensor(7)}, "'w'"),
    ({"w": torch.ones(3, 4, dtype=torch.float64), "b": torch.zeros(4), "count": torch.tensor(7)}, "float64"),
    ({**GLOBAL, "extra": torch.zeros(1)}, "unexpected"),
])  # fmt: skip
def test_incompatible_update_is_refused(update: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(UpdateRefused, match=match):
        protect_update({"params": params_to_bytes(update)}, RECEIVED, DPPolicy())


def test_junk_or_missing_params_are_refused() -> None:
    with pytest.raises(UpdateRefused, match="not safetensors"):
        protect_update({"params": b"\x80\x04junk"}, RECEIVED, DPPolicy())
    with pytest.raises(UpdateRefused, match="no 'params'"):
        protect_update({}, RECEIVED, DPPolicy())


def test_extra_blobs_are_refused_when_the_update_is_clipped() -> None:
    blobs = {"params": params_to_bytes(_update(0.1)), "control_delta": params_to_bytes({"w": torch.zeros(3, 4)})}
    with pytest.raises(UpdateRefused, match="control_delta"):
        protect_update(blobs, RECEIVED, DPPolicy(update_clip=1.0))


def test_noise_needs_a_clip() -> None:
    with pytest.raises(ValueError, match="update_clip"):
        DPPolicy(update_noise=1.0)


def test_frames_round_trip_and_junk_is_a_protocol_error() -> None:
    frame = encode({"op": "result", "n": 1}, {"params": b"abc", "control": b""})
    assert decode(frame) == ({"op": "result", "n": 1}, {"params": b"abc", "control": b""})
    import pickle

    for junk in (b"", pickle.dumps(("reply", "t", b"x")), frame[:-1], frame + b"x",
                 (5).to_bytes(8, "little") + b"[1,2]", (2).to_bytes(8, "little") + b"{}"):  # fmt: skip
        with pytest.raises(WorkerProtocolError):
            decode(junk)
