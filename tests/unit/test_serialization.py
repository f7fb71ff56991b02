"""Parameters travel as safetensors; pickles and torch.save archives are refused unread."""

import io
import json
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.common.errors import SerializationError
from fedsilo.common.serialization import check_compatible, non_finite, params_from_bytes, params_to_bytes, parse_header


class _Boom:
    """Unpickling this would run code: the test proves it never is."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_round_trip_is_exact():
    model = torch.nn.Linear(4, 3)
    back = params_from_bytes(params_to_bytes(model.state_dict()))
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_payload_refused(protocol):
    with pytest.raises(SerializationError, match="pickle"):
        params_from_bytes(pickle.dumps({"w": _Boom()}, protocol=protocol))


def test_torch_save_archive_refused():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with pytest.raises(SerializationError):
        params_from_bytes(buf.getvalue())


@pytest.mark.parametrize("junk", [b"", b"1234", b"\xff" * 64, (10**9).to_bytes(8, "little") + b"{}"])
def test_junk_refused(junk):
    with pytest.raises(SerializationError):
        params_from_bytes(junk)


def test_incompatible_shapes_named():
    ref = torch.nn.Linear(4, 3).state_dict()
    other = torch.nn.Linear(5, 3).state_dict()
    with pytest.raises(SerializationError, match="weight"):
        check_compatible(other, ref)
    with pytest.raises(SerializationError, match="missing"):
        check_compatible({"weight": ref["weight"]}, ref)


# ---------------------------------------------------------------- the header is parsed, never sniffed

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]  # fmt: skip
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _payload(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64).to(
        dtype
    )


names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24).filter(
    lambda s: s != "__metadata__"
)
state_dicts = st.dictionaries(
    names,
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 7), max_size=4), st.integers(0, 2**31)),
    max_size=8,
).map(lambda spec: {k: _tensor(d, shape, seed) for k, (d, shape, seed) in spec.items()})


def test_linear_784_10_round_trips():
    """The classic MNIST logistic regression: its header length is 128 mod 256, so byte 0 is 0x80."""
    model = torch.nn.Linear(784, 10)
    payload = params_to_bytes(model.state_dict())
    assert payload[0] == 0x80
    back = params_from_bytes(payload)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@QUICK
@given(state_dicts)
def test_every_state_dict_round_trips(params):
    back = params_from_bytes(params_to_bytes(params))
    assert back.keys() == params.keys()
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)


@QUICK
@given(state_dicts, st.data())
def test_truncated_or_extended_payloads_refused(params, data):
    payload = params_to_bytes(params)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(SerializationError):
        params_from_bytes(payload[:cut])
    with pytest.raises(SerializationError):
        params_from_bytes(payload + data.draw(st.binary(min_size=1, max_size=64)))


@QUICK
@given(st.recursive(st.none() | st.integers() | st.floats() | st.text() | st.binary(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20),
       st.integers(0, pickle.HIGHEST_PROTOCOL))  # fmt: skip
def test_pickles_of_anything_refused(obj, protocol):
    with pytest.raises(SerializationError):
        params_from_bytes(pickle.dumps({"w": _Boom(), "obj": obj}, protocol=protocol))


@QUICK
@given(state_dicts)
def test_torch_save_archives_refused(params):
    buf = io.BytesIO()
    torch.save(params, buf)
    with pytest.raises(SerializationError):
        params_from_bytes(buf.getvalue())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_junk_raises_nothing_but_serialization_error(junk):
    try:
        out = params_from_bytes(junk)
    except SerializationError:
        return
    assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())


@QUICK
@given(state_dicts, st.data())
def test_mutated_headers_parse_cleanly_or_are_refused(params, data):
    """Any byte of a real payload changed: a clean refusal or a consistent state dict, nothing else."""
    payload = bytearray(params_to_bytes(params))
    header_end = 8 + int.from_bytes(payload[:8], "little")
    at = data.draw(st.integers(0, header_end - 1))
    payload[at] = data.draw(st.integers(0, 255))
    try:
        out = params_from_bytes(bytes(payload))
    except SerializationError:
        return
    assert params_from_bytes(params_to_bytes(out)).keys() == out.keys()


def test_deeply_nested_header_is_a_clean_refusal():
    """20,000 nested arrays in 40 KB: json.loads would raise RecursionError and lose the round."""
    deep = b"[" * 20_000 + b"]" * 20_000
    with pytest.raises(SerializationError, match="deep"):
        params_from_bytes(struct.pack("<Q", len(deep)) + deep)
    deep_in_entry = b'{"w": {"dtype": "F32", "shape": ' + b"[" * 20_000 + b"]" * 20_000 + b', "data_offsets": [0, 0]}}'
    with pytest.raises(SerializationError, match="deep"):
        params_from_bytes(struct.pack("<Q", len(deep_in_entry)) + deep_in_entry)


W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ([], b"", "not a JSON object"),
        ({"w": {**W, "extra": 1}}, bytes(8), "exactly dtype"),
        ({"w": {**W, "dtype": "F4"}}, bytes(8), "unsupported dtype"),
        ({"w": {**W, "dtype": "PICKLE"}}, bytes(8), "unsupported dtype"),
        ({"w": {**W, "shape": [True, 2]}}, bytes(8), "shape"),
        ({"w": {**W, "shape": [-2]}}, bytes(8), "shape"),
        ({"w": {**W, "shape": [2.0]}}, bytes(8), "shape"),
        ({"w": {**W, "data_offsets": [0, 12]}}, bytes(12), "needs 8"),
        ({"w": {**W, "data_offsets": [4, 12]}}, bytes(12), "starts at byte 4"),
        ({"w": W, "v": W}, bytes(8), "starts at byte 0"),  # two tensors on the same bytes
        ({"w": W}, bytes(16), "data area holds 16"),  # bytes no tensor accounts for
        ({"w": W, "__metadata__": {"a": 1}}, bytes(8), "__metadata__"),
    ],
    ids=[
        "list",
        "extra-key",
        "F4",
        "unknown-dtype",
        "bool-dim",
        "negative-dim",
        "float-dim",
        "size-mismatch",
        "gap",
        "overlap",
        "unaccounted-bytes",
        "metadata-not-str",
    ],
)
def test_inconsistent_headers_refused(header, data, match):
    with pytest.raises(SerializationError, match=match):
        params_from_bytes(_payload(header, data))


def test_duplicate_tensor_names_refused():
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [4, 8]}}'  # fmt: skip
    with pytest.raises(SerializationError, match="twice"):
        params_from_bytes(struct.pack("<Q", len(text)) + text + bytes(8))


def test_header_with_metadata_and_empty_tensors_accepted():
    params = {"a": torch.zeros(0, 3), "b": torch.ones(2), "c": torch.zeros(0)}
    payload = params_to_bytes(params, metadata={"format": "pt"})
    assert set(parse_header(payload)) == {"a", "b", "c"}
    assert params_from_bytes(payload).keys() == params.keys()
    assert params_from_bytes(params_to_bytes({})) == {}


def test_non_finite_names_tensors():
    params = {"ok": torch.ones(3), "nan": torch.tensor([0.0, float("nan")]), "inf": torch.tensor([float("-inf")]),
              "int": torch.tensor([1, 2]), "f8": torch.tensor([float("nan")]).to(torch.float8_e5m2)}  # fmt: skip
    assert non_finite(params) == ["nan", "inf", "f8"]


_ENTRIES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from([3.0e38, -3.0e38, 65504.0, float("nan"), float("inf"), float("-inf")]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_ENTRIES, min_size=0, max_size=40), st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                                                     torch.float64, torch.complex64]))
def test_non_finite_agrees_with_the_element_wise_check(values: list[float], dtype: torch.dtype) -> None:
    """The sum's shortcut never hides a NaN or an infinity, and a large finite tensor (whose sum overflows)
    is not refused."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    exact = bool(torch.isfinite(t).all())
    assert non_finite({"t": t}) == ([] if exact else ["t"])
