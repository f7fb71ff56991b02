"""The node's daemon without torch: its modules import none, and the numpy stages it runs on an update
(common/arrays.py's parser, checks and dtype conversions) agree with the torch ones the worker and the
researcher use, bfloat16 and float8 included."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.common import arrays
from fedsilo.common.arrays import arrays_from_bytes, arrays_to_bytes, narrow
from fedsilo.common.codecs import Compression
from fedsilo.common.codecs_quant import to_float16
from fedsilo.common.codecs_update import decode_update, encode_update
from fedsilo.common.errors import SerializationError
from fedsilo.common.serialization import check_compatible, non_finite, params_from_bytes, params_to_bytes, to_numpy
from fedsilo.node.compression import RESIDUAL_FILE, load_residual
from fedsilo.node.config import DPPolicy
from fedsilo.node.protection import clip_and_noise, protect_update

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]

DAEMON_MODULES = ["fedsilo.node.daemon", "fedsilo.node.runner", "fedsilo.node.daemon_round",
                  "fedsilo.node.protection", "fedsilo.node.compression", "fedsilo.node.secagg", "fedsilo.node.dp_round",
                  "fedsilo.node.metric_bounds", "fedsilo.node.transfer", "fedsilo.network.filestore_client",
                  "fedsilo.common.codecs_update", "fedsilo.common.secagg.layout", "fedsilo.common.arrays"]  # fmt: skip


# ------------------------------------------------------------------ no torch in the daemon
def test_the_daemon_its_cli_and_its_round_stages_import_no_torch() -> None:
    """`fedsilo node start`'s import path and every module the daemon's round imports lazily, then the stages
    run on an update: torch stays out of the process (147 MiB of private memory it would add to each node)."""
    script = textwrap.dedent(f"""
        import importlib, sys
        from fedsilo.common.cli import main                   # the console script's module
        from fedsilo.node.cli import start                    # `fedsilo node start` -> daemon.run
        for name in {DAEMON_MODULES!r}:
            importlib.import_module(name)
        import numpy as np
        from fedsilo.common.arrays import arrays_from_bytes, arrays_to_bytes
        from fedsilo.common.codecs import Compression
        from fedsilo.common.codecs_update import encode_update
        from fedsilo.common.secagg.layout import flat_delta, to_blob
        from fedsilo.node.config import DPPolicy
        from fedsilo.node.protection import protect_update
        received = {{"w": np.zeros((4, 3), np.float32), "n": np.array(3)}}
        update = {{"w": np.ones((4, 3), np.float32), "n": np.array(4)}}
        dp = DPPolicy(update_clip=0.5, update_noise=1.0)
        out = protect_update({{"params": arrays_to_bytes(update)}}, received, dp)
        encode_update(arrays_from_bytes(out.blobs["params"]), received, Compression.of("int8"))
        to_blob(flat_delta(update, received).astype(np.uint64), received)
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------ the numpy checks agree with torch's
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, 65504.0, 65520.0, 448.0, 464.0, 3e38])
VALUES = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), SPECIAL), max_size=40)


@SETTINGS
@given(VALUES, st.sampled_from(FLOATS))
def test_non_finite_agrees_with_torch(values: list[float], dtype: torch.dtype) -> None:
    t = torch.tensor(values, dtype=torch.float64).to(dtype) if values else torch.zeros(0, dtype=dtype)
    params = {"a": t, "b": t.reshape(-1, 1) if t.numel() else t, "i": torch.arange(3)}
    assert arrays.non_finite({k: to_numpy(v) for k, v in params.items()}) == non_finite(params)


@SETTINGS
@given(VALUES, st.sampled_from([torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
                                torch.float32]), st.sampled_from([np.float32, np.float64]))  # fmt: skip
def test_narrowing_rounds_as_torch_does(values: list[float], dtype: torch.dtype, source: type) -> None:
    """DP's float64 result and a decoded update go back to the model's dtype: the same bits as torch's `.to`."""
    wide = np.array(values, dtype=np.float64).astype(source)
    ours = narrow(wide, to_numpy(torch.zeros(0, dtype=dtype)).dtype)
    theirs = to_numpy(torch.from_numpy(wide).to(dtype))
    same = (ours.view(f"u{ours.itemsize}") == theirs.view(f"u{theirs.itemsize}"))
    both_nan = np.isnan(ours.astype(np.float32)) & np.isnan(theirs.astype(np.float32))  # NaN payloads may differ
    assert (same | both_nan).all(), (wide[~(same | both_nan)], ours[~(same | both_nan)], theirs[~(same | both_nan)])


@SETTINGS
@given(st.lists(st.integers(0, 4), max_size=3), st.sampled_from([*FLOATS, torch.int64, torch.bool, torch.uint8]),
       st.sampled_from([*FLOATS, torch.int64]), st.booleans())  # fmt: skip
def test_compatibility_check_agrees_with_torch(shape: list[int], dtype: torch.dtype, other: torch.dtype,
                                               reshape: bool) -> None:  # fmt: skip
    ref = {"w": torch.zeros(shape, dtype=dtype), "b": torch.zeros(2)}
    got = {"w": torch.zeros([*shape, 1] if reshape else shape, dtype=other), "b": torch.zeros(2)}
    errors = []
    for check, a, b in ((check_compatible, got, ref),
                        (arrays.check_compatible, *({k: to_numpy(v) for k, v in p.items()} for p in (got, ref)))):
        try:
            check(a, b)
            errors.append(None)
        except SerializationError as exc:
            errors.append(str(exc).replace("torch.", "").replace("torch.Size(", "").replace("])", "]"))
    assert (errors[0] is None) == (errors[1] is None)
    if errors[1] is not None:
        assert str(dtype).removeprefix("torch.") in errors[1] or "'w'" in errors[1]


# ------------------------------------------------------------------ one parser: bytes, views, dtypes
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_numpy_and_torch_writers_give_the_same_bytes_and_values(dtype: torch.dtype) -> None:
    params = {"m": torch.randn(3, 5).to(dtype), "s": torch.tensor(1.5).to(dtype), "e": torch.zeros(0, 4, dtype=dtype)}
    data = params_to_bytes(params)
    parsed = arrays_from_bytes(data)
    assert arrays_to_bytes(parsed) == data  # one writer: the bytes, and so the content hash, are the same
    assert {k: (a.shape, str(a.dtype)) for k, a in parsed.items()} == {
        k: (tuple(t.shape), str(to_numpy(t).dtype)) for k, t in params.items()}  # fmt: skip
    back = params_from_bytes(data)
    assert all(back[k].dtype == dtype and torch.equal(back[k].view(torch.uint8) if dtype.itemsize == 1 else back[k],
                                                      params[k].view(torch.uint8) if dtype.itemsize == 1 else params[k])
               for k in params)  # fmt: skip


def test_views_share_a_writable_buffer_and_read_only_input_is_copied() -> None:
    data = params_to_bytes({"w": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, dtype=torch.bfloat16)})
    buf = bytearray(data)
    shared = arrays_from_bytes(buf, copy=False)
    assert np.shares_memory(shared["w"], np.frombuffer(buf, np.uint8))
    own = arrays_from_bytes(bytes(data), copy=False)  # read-only: each array gets its own, writable memory
    assert own["w"].flags.writeable and not np.shares_memory(own["w"], np.frombuffer(buf, np.uint8))
    unaligned = bytearray(1) + buf  # tensors at odd addresses: copied (numpy and torch want aligned items)
    moved = arrays_from_bytes(memoryview(unaligned)[1:], copy=False)
    assert moved["w"].ctypes.data % 4 == 0 and (moved["w"] == np.arange(6)).all()
    assert moved["b"].dtype == ml_dtypes.bfloat16 and (moved["b"].astype(np.float32) == 1).all()


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [1] * 65, [2**61, 0, 8]])
def test_absurd_shapes_of_empty_tensors_are_refused_cleanly(shape: list[int]) -> None:
    """An empty tensor spans 0 bytes whatever its shape: a hostile header must not crash the allocator."""
    head = ('{"x":{"dtype":"F64","shape":' + str(shape) + ',"data_offsets":[0,0]}}').encode()
    with pytest.raises(SerializationError, match="dimensions"):
        arrays_from_bytes(len(head).to_bytes(8, "little") + head)


# ------------------------------------------------------------------ bfloat16 and float8 through the daemon's stages
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_dp_clipping_of_a_low_precision_model_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(8, 4, generator=g).to(dtype), "n": torch.tensor(3)}
    update = {"w": (received["w"].double() + torch.randn(8, 4, generator=g, dtype=torch.float64)).to(dtype),
              "n": torch.tensor(4)}  # fmt: skip
    out = protect_update({"params": params_to_bytes(update)}, {k: to_numpy(v) for k, v in received.items()},
                         DPPolicy(update_clip=0.5))  # fmt: skip
    got = params_from_bytes(out.blobs["params"])
    delta = update["w"].double() - received["w"].double()  # torch's arithmetic, as protection.py did before numpy
    expected = (received["w"].double() + delta * min(1.0, 0.5 / float(delta.norm()))).to(dtype)
    assert got["w"].dtype == dtype and torch.equal(got["w"].view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(got["n"], update["n"])


def test_a_bfloat16_nan_is_refused_and_noise_keeps_the_dtype() -> None:
    received = {"w": np.zeros(1000, ml_dtypes.bfloat16)}
    bad = params_to_bytes({"w": torch.tensor([1.0, math.nan] * 500, dtype=torch.bfloat16)})
    with pytest.raises(Exception, match="NaN or infinity in w"):
        protect_update({"params": bad}, received, DPPolicy())
    noised, _ = clip_and_noise({"w": received["w"].copy()}, received, clip=1.0, multiplier=1.0,
                               generator=np.random.default_rng(0))  # fmt: skip
    assert noised["w"].dtype == ml_dtypes.bfloat16 and float(noised["w"].astype(np.float32).std()) == pytest.approx(
        1.0, rel=0.1)  # fmt: skip


def test_a_bfloat16_model_compresses_on_the_node_and_decodes_on_the_researcher() -> None:
    g = torch.Generator().manual_seed(1)
    ref = {"w": torch.randn(16, 16, generator=g).to(torch.bfloat16)}
    upd = {"w": (ref["w"].float() + 0.01 * torch.randn(16, 16, generator=g)).to(torch.bfloat16)}
    for codec in ("float16", "int8"):
        spec = Compression.of(codec)
        blob = encode_update({"w": to_numpy(upd["w"])}, {"w": to_numpy(ref["w"])}, spec).to_bytes()
        out = decode_update(blob, ref, spec)
        assert out["w"].dtype == torch.bfloat16
        err = (out["w"].float() - upd["w"].float()).abs().max()
        assert float(err) <= float((upd["w"].float() - ref["w"].float()).abs().max()) / 127 + 0.02  # + bf16's step


def test_a_residual_written_by_the_torch_writer_is_read_by_the_daemon(tmp_path: Path) -> None:
    """Error feedback's file did not change format when the daemon left torch: one written before still counts."""
    residual = {"w": torch.full((4, 3), 0.25)}
    (tmp_path / RESIDUAL_FILE).write_bytes(params_to_bytes(residual))
    loaded = load_residual(tmp_path)
    assert loaded is not None and (loaded["w"] == 0.25).all() and loaded["w"].dtype == np.float32
    ref = {"w": np.zeros((4, 3), np.float32)}
    enc = encode_update(ref, ref, Compression(codec="topk", fraction=0.5), loaded)
    assert sorted(np.abs(enc.tensors["v/w"]).tolist()) == [0.25] * 6  # the carried residual was sent


@SETTINGS
@given(st.sampled_from([1.0, 1e-3, 1e-4, 1e-5, 1e-7]), st.integers(0, 2**31), st.integers(0, 2000))
def test_the_float16_cast_gives_numpys_and_torchs_bits(scale: float, seed: int, size: int) -> None:
    """The codec's own cast of float16 subnormals (`to_float16`) is bit for bit the ordinary cast."""
    x = (np.random.default_rng(seed).standard_normal(size) * scale).astype(np.float32)
    x[: min(size, 3)] = [-0.0, 2.0**-25, -(2.0**-24) * 1.5][: min(size, 3)]  # ties to even, signed zero
    ours = to_float16(x).view(np.uint16)
    assert (ours == x.astype(np.float16).view(np.uint16)).all()
    assert (ours == torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)).all()


def test_a_float64_update_whose_squares_overflow_is_clipped_with_a_finite_norm() -> None:
    """A hostile (or wild) float64 update of 1e200s: the squares pass float64's range, the norm must not."""
    received = {"w": np.zeros(4)}
    out, applied = clip_and_noise({"w": np.full(4, 1e200)}, received, clip=1.0, multiplier=0.0)
    assert applied["update_clip"]["norm"] == pytest.approx(2e200) and applied["update_clip"]["clipped"]
    assert np.allclose(out["w"], 0.5)  # clipped to norm 1, the direction kept
