"""Parameters travel as safetensors; pickles and torch.save archives are refused unread."""

import io
import pickle

import pytest
import torch

from fedsilo.common.errors import SerializationError
from fedsilo.common.serialization import check_compatible, params_from_bytes, params_to_bytes


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
