"""Communication compression of a node's update (issue 11), as FedLab's compressors: what the researcher
asks for, typed once and validated on both sides. This module imports no torch: `network/messages.py`
carries a `Compression` in every `TrainRequest`, and the node's CLI must start without torch.

A researcher chooses one codec per experiment; the node encodes the delta of its `params` blob (update
minus the received global model) after its output protections, the researcher decodes it back before
the algorithm's `add` (`codecs_update.py`). The global model the researcher sends stays float32.

| codec | on the wire, per floating-point tensor | error per coordinate of the delta |
|---|---|---|
| `float16` | the delta in float16 (2 bytes) | float16's rounding: relative 2^-11, saturated at +-65504 |
| `int8` | int8 codes (1 byte), a float32 scale = max abs / 127 | nearest <= scale / 2; stochastic < scale, unbiased |
| `topk` | the `fraction` largest-magnitude entries: int32 indices + float32 values | dropped entries only |

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): the node adds what the codec dropped
last round (the residual, kept per researcher and job in its state folder, as SCAFFOLD's c_i) before it
encodes, so nothing is lost, only delayed. On by default for `int8` and `topk`, off for `float16` (its error
is four orders below int8's, and the residual costs a model-sized state file).

    >>> Compression.of("int8")
    Compression(codec='int8', rounding='nearest', fraction=None, error_feedback=True)
    >>> Compression(codec="topk", fraction=0.01).error_feedback
    True
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import FedsiloError, SerializationError

CODECS = ("float16", "int8", "topk")
CODEC_VERSION = "1"
"""The blob layout's version, in each codec blob's safetensors `__metadata__` (`fedsilo.codec_version`)."""


class CompressionError(FedsiloError):
    """A compression setting is not valid (unknown codec, a fraction outside (0, 1], ...); the message says which."""


class CodecError(SerializationError):
    """A codec blob does not decode: wrong codec, names, shapes, dtypes, indices or a non-finite value."""


class Compression(BaseModel):
    """One experiment's update codec: `codec` (float16 | int8 | topk), int8's `rounding` (nearest, the default:
    with error feedback the smaller error wins; stochastic: unbiased without it), topk's `fraction` of entries
    kept per tensor (0 < fraction <= 1; required), and `error_feedback` (default: on for int8 and topk).

        Experiment(..., compression="int8")
        Experiment(..., compression=Compression(codec="topk", fraction=0.01))
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    codec: Literal["float16", "int8", "topk"]
    rounding: Literal["nearest", "stochastic"] = "nearest"
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    error_feedback: bool = None  # type: ignore[assignment]  # None = the codec's default, filled below

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("error_feedback") is None:
            data = {**data, "error_feedback": data.get("codec") in ("int8", "topk")}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Compression:
        if self.codec == "topk" and self.fraction is None:
            raise ValueError("topk needs a fraction of entries to keep, e.g. Compression(codec='topk', fraction=0.01)")
        if self.codec != "topk" and self.fraction is not None:
            raise ValueError(f"fraction is topk's setting, not {self.codec}'s")
        if self.codec != "int8" and self.rounding != "nearest":
            raise ValueError(f"rounding is int8's setting, not {self.codec}'s")
        return self

    @classmethod
    def of(cls, value: str | Compression | dict[str, Any] | None) -> Compression | None:
        """A researcher's argument as a `Compression` (None = no compression); `CompressionError` otherwise."""
        if value is None or isinstance(value, Compression):
            return value
        if isinstance(value, str):
            if value in ("", "none"):
                return None
            value = {"codec": value}
        if not isinstance(value, dict):
            raise CompressionError(f"compression must be one of {', '.join(CODECS)}, a Compression or None, "
                                   f"not {type(value).__name__}")  # fmt: skip
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "compression"
            raise CompressionError(f"compression: {where}: {first.get('msg')}") from None


def plain_for_masks(value: Compression | None, info: Any) -> Compression | None:
    """`TrainRequest.compression`'s check on receipt: refused beside `secagg`, whose masks need the plain
    encoding (a pydantic field validator; `secagg` is declared before `compression`)."""
    if value is not None and info.data.get("secagg") is not None:
        raise ValueError("compression and secure aggregation do not combine: masks need the plain encoding")
    return value
