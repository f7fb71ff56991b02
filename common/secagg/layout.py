"""Between a model's named tensors and the one flat vector that is encoded and masked.

The order is the reference model's names, sorted; both ends hold the same reference (the round's global
model), so nothing about the layout travels. The masked vector travels as a safetensors blob with the model's
names and shapes in int64 (the uint64 words reinterpreted): the researcher checks it against the model like
any update, and nothing new is parsed.

The node's daemon works on numpy arrays (it imports no torch); the researcher's torch tensors are read
through `np.asarray` (no copy on the CPU), and `unflatten` hands it tensors back.

    delta = flat_delta(local, global_params)            # float64, sorted names
    blob = to_blob(masked_words, global_params)          # {name: int64 array}
    assert (from_blob(blob, global_params) == masked_words).all()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import SecaggError

if TYPE_CHECKING:
    import torch

Params = Mapping[str, Any]
"""Named arrays (the node) or CPU tensors (the researcher): anything with a shape that numpy can read."""


def _names(reference: Params) -> list[str]:
    return sorted(reference)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def _wide(t: Any) -> np.ndarray:
    """`t` as float64 values (bfloat16 and float8 too: ml_dtypes arrays widen like any float)."""
    if not isinstance(t, np.ndarray):
        from fedsilo.common.serialization import to_numpy  # a torch tensor: torch is imported already

        t = to_numpy(t)
    return t.astype(np.float64)


def flat_delta(update: Params, reference: Params) -> np.ndarray:
    """update - reference over every tensor (integer buffers too), flattened in float64."""
    if set(update) != set(reference):
        raise SecaggError("the update's tensor names differ from the model's")
    parts = []
    for name in _names(reference):
        a, b = update[name], reference[name]
        if _shape(a) != _shape(b):
            raise SecaggError(f"tensor '{name}' has shape {_shape(a)}, the model {_shape(b)}")
        delta = _wide(a)
        delta -= _wide(b)
        parts.append(delta.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def split(vector: np.ndarray, reference: Params) -> dict[str, np.ndarray]:
    """A flat vector back into arrays with the reference's names and shapes (copies, in `vector`'s dtype)."""
    out, offset = {}, 0
    for name in _names(reference):
        shape = _shape(reference[name])
        n = math.prod(shape)
        out[name] = np.array(vector[offset : offset + n]).reshape(shape)
        offset += n
    if offset != len(vector):
        raise SecaggError(f"{len(vector)} values for a model of {offset}")
    return out


def unflatten(vector: np.ndarray, reference: Params) -> dict[str, torch.Tensor]:
    """A flat float64 vector back into float64 tensors with the reference's names and shapes (the researcher)."""
    import torch

    return {name: torch.from_numpy(a) for name, a in split(np.asarray(vector, dtype=np.float64), reference).items()}


def size(reference: Params) -> int:
    return sum(math.prod(_shape(t)) for t in reference.values())


def to_blob(words: np.ndarray, reference: Params) -> dict[str, np.ndarray]:
    """The masked uint64 words as int64 arrays in the model's layout (what the node uploads)."""
    return split(np.asarray(words, dtype=np.uint64).view(np.int64), reference)


def from_blob(blob: Params, reference: Params) -> np.ndarray:
    """The uint64 words of a masked blob; names, shapes and the int64 dtype must be the model's layout."""
    if set(blob) != set(reference):
        raise SecaggError("the masked update's tensor names differ from the model's")
    parts = []
    for name in _names(reference):
        t = blob[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != "int64" or _shape(t) != _shape(reference[name]):
            raise SecaggError(f"masked tensor '{name}' is {dtype} {_shape(t)}, expected int64 "
                              f"{_shape(reference[name])}")  # fmt: skip
        parts.append(np.asarray(t).reshape(-1))
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)).view(np.uint64)
