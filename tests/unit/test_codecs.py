"""Update codecs (common/codecs*.py): each round-trips within its stated error, error feedback keeps what
a codec dropped, and a hostile node's codec blob is refused with a reason. The codecs compute in numpy (the
node's daemon has no torch); these tests build their data with torch and hand the codecs its arrays."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.common.codecs import CodecError, Compression, CompressionError
from fedsilo.common.codecs_quant import Float16Codec, Int8Codec
from fedsilo.common.codecs_topk import TopkCodec, kept
from fedsilo.common.codecs_update import decode_update, encode_update, fits_residual
from fedsilo.common.errors import SerializationError
from fedsilo.common.serialization import params_to_bytes, to_numpy, to_torch

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


@st.composite
def deltas(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3]))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _model(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(shape, generator=g).to(dtype), "b": torch.randn(3, generator=g).to(dtype),
            "bn.num_batches_tracked": torch.tensor(7)}  # fmt: skip


def _np(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: to_numpy(t) for n, t in params.items()}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _moved(model: dict[str, torch.Tensor], seed: int, step: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return {n: (t.float() + step * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t + 1
            for n, t in model.items()}  # fmt: skip


# ------------------------------------------------------------------ each codec within its stated error
@SETTINGS
@given(deltas())
def test_float16_round_trip_within_float16_rounding(x: torch.Tensor) -> None:
    c = Float16Codec()
    y = torch.from_numpy(c.decode(c.encode(x.numpy()), tuple(x.shape), "w"))
    assert torch.all((y - x).abs() <= x.abs() * 2.0**-11 + 2.0**-24)


@SETTINGS
@given(deltas(), st.sampled_from(["nearest", "stochastic"]), st.integers(0, 1000))
def test_int8_round_trip_within_its_scale(x: torch.Tensor, rounding: str, seed: int) -> None:
    c = Int8Codec(rounding)
    parts = c.encode(x.numpy(), _rng(seed))
    y = torch.from_numpy(c.decode(parts, tuple(x.shape), "w"))
    scale = float(parts["s"])
    assert scale == pytest.approx(float(x.abs().max()) / 127 if x.numel() else 0.0, rel=1e-6)
    bound = scale / 2 if rounding == "nearest" else scale  # stochastic: strictly below one step
    assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + 1e-30)


def test_int8_stochastic_rounding_is_unbiased() -> None:
    x = torch.tensor([1.0, 0.3, -0.55, 0.01])
    c, g = Int8Codec("stochastic"), _rng(0)
    mean = torch.stack([torch.from_numpy(c.decode(c.encode(x.numpy(), g), (4,), "w")) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, x, atol=1.0 / 127 * 0.05)
    nearest = Int8Codec("nearest")
    assert not torch.equal(torch.from_numpy(nearest.decode(nearest.encode(x.numpy()), (4,), "w")), mean)


@SETTINGS
@given(deltas(), st.floats(0.001, 1.0))
def test_topk_keeps_exactly_the_largest_entries(x: torch.Tensor, fraction: float) -> None:
    c = TopkCodec(fraction)
    parts = {key: torch.from_numpy(part) for key, part in c.encode(x.numpy()).items()}
    y = torch.from_numpy(c.decode({key: p.numpy() for key, p in parts.items()}, tuple(x.shape), "w"))
    k = kept(fraction, x.numel())
    assert parts["i"].numel() == k == (min(x.numel(), max(1, math.ceil(fraction * x.numel()))) if x.numel() else 0)
    sent = y != 0
    assert torch.equal(y[sent], x[sent])  # what is sent is exact
    if k and k < x.numel():
        assert float(x[~sent].abs().max()) <= float(x.abs().reshape(-1)[parts["i"].long()].min())


@SETTINGS
@given(shapes, st.sampled_from([torch.float32, torch.float64]), st.integers(0, 10_000),
       st.sampled_from(["float16", "int8", "topk"]))  # fmt: skip
def test_update_round_trip_keeps_names_dtypes_and_the_codec_error(shape: tuple, dtype: torch.dtype, seed: int,
                                                                  codec: str) -> None:  # fmt: skip
    spec = Compression(codec=codec, fraction=0.5 if codec == "topk" else None, error_feedback=False)
    ref = _model(shape, dtype, seed)
    upd = _moved(ref, seed)
    out = decode_update(encode_update(_np(upd), _np(ref), spec).to_bytes(), ref, spec)
    assert {n: (t.dtype, t.shape) for n, t in out.items()} == {n: (t.dtype, t.shape) for n, t in ref.items()}
    assert torch.equal(out["bn.num_batches_tracked"], upd["bn.num_batches_tracked"])  # integers travel as they are
    for name in ("w", "b"):
        delta = upd[name].float() - ref[name].float()
        err = (out[name].float() - upd[name].float()).abs()
        bound = {"float16": delta.abs() * 2.0**-11, "int8": delta.abs().max() / 254 if delta.numel() else 0,
                 "topk": delta.abs()}[codec]  # fmt: skip
        assert torch.all(err <= bound + 1e-6 * (1 + upd[name].float().abs()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_come_back_in_their_dtype(dtype: torch.dtype) -> None:
    ref = _model((4, 5), dtype, 1)
    out = decode_update(encode_update(_np(_moved(ref, 1)), _np(ref), Compression.of("int8")).to_bytes(), ref,
                        Compression.of("int8"))  # fmt: skip
    assert all(out[n].dtype == ref[n].dtype for n in ref)


def test_compressed_blobs_are_smaller() -> None:
    ref = {"w": torch.randn(256, 256)}
    upd = _moved(ref, 0)
    plain = len(params_to_bytes(upd))
    sizes = {c: len(encode_update(_np(upd), _np(ref), s).to_bytes()) for c, s in
             {"float16": Compression.of("float16"), "int8": Compression.of("int8"),
              "topk": Compression(codec="topk", fraction=0.01)}.items()}  # fmt: skip
    assert sizes["float16"] < plain * 0.51 and sizes["int8"] < plain * 0.26 and sizes["topk"] < plain * 0.03


# ------------------------------------------------------------------ error feedback
@pytest.mark.parametrize("spec", [Compression.of("int8"), Compression(codec="topk", fraction=0.05),
                                  Compression(codec="int8", rounding="stochastic")])  # fmt: skip
def test_error_feedback_delivers_what_was_dropped(spec: Compression) -> None:
    """Over rounds, what the researcher decoded plus the node's residual is exactly what the node meant to send."""
    ref = _model((20, 10), torch.float32, 3)
    residual = None
    meant = {n: torch.zeros(t.shape) for n, t in ref.items() if t.is_floating_point()}
    got = {n: torch.zeros(t.shape) for n in meant for t in [ref[n]]}
    for r in range(6):
        upd = _moved(ref, 10 + r)
        enc = encode_update(_np(upd), _np(ref), spec, residual, _rng(r))
        out = decode_update(enc.to_bytes(), ref, spec)
        for n in meant:
            meant[n] += upd[n] - ref[n]
            got[n] += out[n] - ref[n]
        residual = enc.residual
        assert fits_residual(residual, _np(ref))
    for n in meant:
        assert torch.allclose(got[n] + torch.from_numpy(residual[n]), meant[n], atol=1e-5)
    if spec.codec == "topk":  # 95 % of the entries stay behind each round: the residual carries them
        assert float(np.abs(residual["w"]).sum()) > 0.1


def test_without_error_feedback_nothing_is_kept_and_a_residual_is_ignored() -> None:
    ref = _model((20, 10), torch.float32, 4)
    upd = _moved(ref, 4)
    spec = Compression(codec="topk", fraction=0.05, error_feedback=False)
    junk = {n: np.full(t.shape, 100.0, np.float32) for n, t in ref.items() if t.is_floating_point()}
    enc = encode_update(_np(upd), _np(ref), spec, junk)
    assert enc.residual == {}
    assert float(decode_update(enc.to_bytes(), ref, spec)["w"].sub(ref["w"]).abs().max()) < 1.0


def test_a_residual_that_does_not_fit_the_model_is_ignored() -> None:
    ref = _model((4, 4), torch.float32, 5)
    upd = _moved(ref, 5)
    spec = Compression.of("int8")
    for bad in ({"w": torch.ones(3, 3), "b": torch.ones(3)}, {"w": torch.full((4, 4), math.nan), "b": torch.ones(3)},
                {"w": torch.ones(4, 4)}, {"w": torch.ones(4, 4, dtype=torch.float64), "b": torch.ones(3)}):  # fmt: skip
        assert not fits_residual(_np(bad), _np(ref))
        assert encode_update(_np(upd), _np(ref), spec, _np(bad)).to_bytes() == \
            encode_update(_np(upd), _np(ref), spec).to_bytes()  # fmt: skip


# ------------------------------------------------------------------ the setting
@pytest.mark.parametrize("value, why", [
    ("zip", "codec"), ({"codec": "topk"}, "fraction"), ({"codec": "topk", "fraction": 0}, "fraction"),
    ({"codec": "topk", "fraction": 1.5}, "fraction"), ({"codec": "topk", "fraction": math.nan}, "fraction"),
    ({"codec": "float16", "rounding": "stochastic"}, "rounding"), ({"codec": "int8", "fraction": 0.1}, "fraction"),
    ({"codec": "int8", "bits": 4}, "bits"), (8, "int"),
])  # fmt: skip
def test_bad_settings_are_refused_naming_the_key(value: object, why: str) -> None:
    with pytest.raises(CompressionError, match=why):
        Compression.of(value)  # type: ignore[arg-type]


def test_settings_and_their_defaults() -> None:
    assert Compression.of(None) is None and Compression.of("none") is None
    assert Compression.of("int8").error_feedback and not Compression.of("float16").error_feedback
    assert not Compression(codec="int8", error_feedback=False).error_feedback
    spec = Compression(codec="topk", fraction=0.01)
    assert Compression.model_validate(spec.model_dump(mode="json")) == spec


# ------------------------------------------------------------------ hostile blobs
REF = _model((6, 4), torch.float32, 9)
UPD = _moved(REF, 9)


def _blob(spec: Compression, change: dict | None = None, drop: str | None = None,
          metadata: dict[str, str] | None = None) -> bytes:  # fmt: skip
    enc = encode_update(_np(UPD), _np(REF), spec)
    tensors = {**{n: to_torch(a) for n, a in enc.tensors.items()}, **(change or {})}
    if drop:
        tensors.pop(drop)
    return params_to_bytes(tensors, metadata=enc.metadata if metadata is None else metadata)


INT8, TOPK, F16 = Compression.of("int8"), Compression(codec="topk", fraction=0.25), Compression.of("float16")
HOSTILE = {
    "nan scale": (INT8, _blob(INT8, {"s/w": torch.tensor(math.nan)}), "scale"),
    "infinite scale": (INT8, _blob(INT8, {"s/w": torch.tensor(math.inf)}), "scale"),
    "negative scale": (INT8, _blob(INT8, {"s/w": torch.tensor(-1.0)}), "scale"),
    "scale overflowing float32": (INT8, _blob(INT8, {"s/w": torch.tensor(3e38)}), "scale"),
    "scale as a vector": (INT8, _blob(INT8, {"s/w": torch.ones(2)}), "part 's'"),
    "codes of another shape": (INT8, _blob(INT8, {"q/w": torch.zeros(4, 6, dtype=torch.int8)}), "part 'q'"),
    "codes of another dtype": (INT8, _blob(INT8, {"q/w": torch.zeros(6, 4, dtype=torch.int16)}), "part 'q'"),
    "code -128": (INT8, _blob(INT8, {"q/w": torch.full((6, 4), -128, dtype=torch.int8)}), "-128"),
    "a missing part": (INT8, _blob(INT8, drop="s/b"), "missing"),
    "an extra tensor": (INT8, _blob(INT8, {"q/extra": torch.zeros(2, dtype=torch.int8)}), "unexpected"),
    "a raw float tensor": (INT8, _blob(INT8, {"r/w": UPD["w"]}), "unexpected"),
    "another codec's blob": (INT8, _blob(F16), "int8"),
    "no header": (INT8, _blob(INT8, metadata={}), "codec blob"),
    "a future version": (INT8, _blob(INT8, metadata={"fedsilo.codec": "int8", "fedsilo.codec_version": "9"}),
                         "version"),
    "an integer buffer of another dtype": (INT8, _blob(INT8, {"r/bn.num_batches_tracked": torch.tensor(7.0)}),
                                           "num_batches_tracked"),
    "unsorted indices": (TOPK, _blob(TOPK, {"i/w": torch.tensor([0, 1, 2, 5, 3, 4], dtype=torch.int32)}),
                         "ascending"),
    "index past the end": (TOPK, _blob(TOPK, {"i/w": torch.tensor([0, 1, 2, 3, 4, 24], dtype=torch.int32)}),
                           "within"),
    "negative index": (TOPK, _blob(TOPK, {"i/w": torch.tensor([-1, 1, 2, 3, 4, 5], dtype=torch.int32)}), "within"),
    "repeated index": (TOPK, _blob(TOPK, {"i/w": torch.tensor([0, 1, 1, 3, 4, 5], dtype=torch.int32)}),
                       "distinct"),
    "more entries than the fraction": (TOPK, _blob(TOPK, {"i/w": torch.arange(24, dtype=torch.int32),
                                                          "v/w": torch.ones(24)}), "at most 6"),
    "counts that differ": (TOPK, _blob(TOPK, {"v/w": torch.ones(5)}), "same count"),
    "int64 indices": (TOPK, _blob(TOPK, {"i/w": torch.arange(6)}), "int32"),
    "nan values": (TOPK, _blob(TOPK, {"v/w": torch.full((6,), math.nan)}), "NaN"),
    "float16 infinity": (F16, _blob(F16, {"h/w": torch.full((6, 4), math.inf, dtype=torch.float16)}), "NaN"),
    "a pickle": (INT8, pickle.dumps({"w": 1}), "safetensors"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_codec_blobs_are_refused_with_a_reason(case: str) -> None:
    spec, data, why = HOSTILE[case]
    with pytest.raises(SerializationError, match=why):
        decode_update(data, REF, spec)


def test_values_that_overflow_when_added_are_refused() -> None:
    ref = {"w": torch.full((2,), 3e38)}
    spec = Compression.of("int8")
    blob = params_to_bytes({"q/w": torch.full((2,), 127, dtype=torch.int8), "s/w": torch.tensor(2e36)},
                           metadata={"fedsilo.codec": "int8", "fedsilo.codec_version": "1"})  # fmt: skip
    with pytest.raises(CodecError, match="not finite"):
        decode_update(blob, ref, spec)


def test_a_parameter_name_with_a_slash_cannot_be_encoded() -> None:
    ref = {"a/b": torch.zeros(2)}
    with pytest.raises(CodecError, match="'/'"):
        encode_update(_np(ref), _np(ref), Compression.of("int8"))
