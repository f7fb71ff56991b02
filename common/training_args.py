"""Training arguments: data sent with every round, validated on both sides (unknown keys refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import FedsiloError


class TrainingArgsError(FedsiloError):
    """Training arguments failed validation; the message names the key."""


_DP_KEYS = {"sigma", "clip", "delta", "type"}


class TrainingArgs(BaseModel):
    """What a researcher may ask of a round. `num_updates`, when set, wins over `epochs`.

    `dp_args`: None, or {"sigma": noise multiplier > 0, "clip": max grad norm > 0,
    optional "delta" (default 1e-5) used to report epsilon, optional "type": "local"}.
    """

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1)
    num_updates: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer_args: dict[str, Any] = Field(default_factory=lambda: {"lr": 0.01})
    loader_args: dict[str, Any] = Field(default_factory=dict)
    test_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    log_interval: int = Field(10, ge=1)
    random_seed: int | None = None
    dry_run: bool = False
    use_gpu: bool = False
    dp_args: dict[str, Any] | None = None

    @field_validator("optimizer_args")
    @classmethod
    def _lr_positive(cls, v: dict[str, Any]) -> dict[str, Any]:
        lr = v.get("lr")
        if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0):
            raise ValueError("'lr' must be a number > 0")
        return v

    @field_validator("loader_args")
    @classmethod
    def _loader_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        # These would let plan data escape the framework's control (pickled workers, custom samplers).
        forbidden = {"dataset", "sampler", "batch_sampler", "collate_fn", "worker_init_fn"} & v.keys()
        if forbidden:
            raise ValueError(f"keys not allowed in loader_args: {sorted(forbidden)}")
        return v

    @field_validator("dp_args")
    @classmethod
    def _dp(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        unknown = v.keys() - _DP_KEYS
        if unknown:
            raise ValueError(f"unknown dp_args keys {sorted(unknown)}; allowed: {sorted(_DP_KEYS)}")
        out: dict[str, Any] = {"type": v.get("type", "local"), "delta": float(v.get("delta", 1e-5))}
        if out["type"] != "local":
            raise ValueError("only local DP (type 'local') is supported")
        for key in ("sigma", "clip"):
            val = v.get(key)
            if not isinstance(val, int | float) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"dp_args '{key}' must be a number > 0")
            out[key] = float(val)
        if not 0 < out["delta"] < 1:
            raise ValueError("dp_args 'delta' must be in (0, 1)")
        return out

    @classmethod
    def parse(cls, data: dict[str, Any] | TrainingArgs | None) -> TrainingArgs:
        """Validate a dict; errors become `TrainingArgsError` naming each offending key."""
        if isinstance(data, TrainingArgs):
            return data
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
                parts.append(f"training_args '{key}': {err['msg']}")
            raise TrainingArgsError("; ".join(parts)) from None
