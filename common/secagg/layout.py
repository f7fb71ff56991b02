"""Between a model's named tensors and the one flat vector that is encoded and masked.

The order is the reference model's names, sorted; both ends hold the same reference (the round's global
model), so nothing about the layout travels. The masked vector travels as a safetensors blob with the model's
names and shapes in int64 (the uint64 words reinterpreted): the researcher checks it against the model like
any update, and nothing new is parsed.

    delta = flat_delta(local, global_params)            # float64, sorted names
    blob = to_blob(masked_words, global_params)          # {name: int64 tensor}
    assert (from_blob(blob, global_params) == masked_words).all()
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .errors import SecaggError

Params = Mapping[str, torch.Tensor]


def _names(reference: Params) -> list[str]:
    return sorted(reference)


def flat_delta(update: Params, reference: Params) -> np.ndarray:
    """update - reference over every tensor (integer buffers too), flattened in float64."""
    if set(update) != set(reference):
        raise SecaggError("the update's tensor names differ from the model's")
    parts = []
    for name in _names(reference):
        a, b = update[name], reference[name]
        if a.shape != b.shape:
            raise SecaggError(f"tensor '{name}' has shape {tuple(a.shape)}, the model {tuple(b.shape)}")
        parts.append((a.detach().cpu().double() - b.detach().cpu().double()).reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, reference: Params) -> dict[str, torch.Tensor]:
    """A flat float64 vector back into float64 tensors with the reference's names and shapes."""
    out, offset = {}, 0
    for name in _names(reference):
        n = reference[name].numel()
        out[name] = torch.from_numpy(np.array(vector[offset : offset + n])).reshape(reference[name].shape)
        offset += n
    if offset != len(vector):
        raise SecaggError(f"{len(vector)} values for a model of {offset}")
    return out


def size(reference: Params) -> int:
    return sum(t.numel() for t in reference.values())


def to_blob(words: np.ndarray, reference: Params) -> dict[str, torch.Tensor]:
    """The masked uint64 words as int64 tensors in the model's layout (what the node uploads)."""
    signed = np.asarray(words, dtype=np.uint64).view(np.int64)
    return {k: v.to(torch.int64) for k, v in unflatten(signed, reference).items()}


def from_blob(blob: Params, reference: Params) -> np.ndarray:
    """The uint64 words of a masked blob; names, shapes and the int64 dtype must be the model's layout."""
    if set(blob) != set(reference):
        raise SecaggError("the masked update's tensor names differ from the model's")
    parts = []
    for name in _names(reference):
        t = blob[name]
        if t.dtype != torch.int64 or t.shape != reference[name].shape:
            raise SecaggError(f"masked tensor '{name}' is {t.dtype} {tuple(t.shape)}, expected int64 "
                              f"{tuple(reference[name].shape)}")  # fmt: skip
        parts.append(t.reshape(-1).numpy())
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)).view(np.uint64)
