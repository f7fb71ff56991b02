"""Model parameters on the wire: safetensors only. Nothing received is ever unpickled."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import SerializationError

_MAGIC_PICKLE = (b"\x80", b"PK")  # pickle protocol header, torch.save zip archive


def params_to_bytes(params: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict (tensors only) to safetensors bytes."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    return _st_save(tensors, metadata=metadata)


def params_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (pickle, torch.save archives, junk) is refused unread."""
    if data[:1] == _MAGIC_PICKLE[0] or data[:2] == _MAGIC_PICKLE[1]:
        raise SerializationError("refused: payload looks like a pickle/torch.save archive, not safetensors")
    if len(data) < 8:
        raise SerializationError("refused: payload too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8:
        raise SerializationError("refused: not a safetensors payload (bad header length)")
    try:
        json.loads(data[8 : 8 + header_len])
        return _st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise SerializationError(f"refused: invalid safetensors payload ({exc})") from exc


def check_compatible(received: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Raise if received parameters do not match the model's names, shapes and dtypes."""
    missing = reference.keys() - received.keys()
    extra = received.keys() - reference.keys()
    if missing or extra:
        raise SerializationError(
            f"parameter names differ from the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for k, ref in reference.items():
        got = received[k]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise SerializationError(
                f"parameter '{k}': got {tuple(got.shape)} {got.dtype}, model has {tuple(ref.shape)} {ref.dtype}"
            )


def state_to_numpy(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in params.items()}
