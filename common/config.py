"""Configuration objects shared by every party: timeouts and limits, TOML I/O with clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Timeouts(BaseModel):
    """Every wait in fedsilo, in seconds, in one place.

    - `connect`: opening the MQTT connection or an HTTP connection to the file store.
    - `request`: a short request/reply exchange (search, ping, plan status, approval request).
    - `transfer`: one file-store upload or download (read timeout between chunks).
    - `round`: how long a researcher waits for a training round's replies before it reports the
      missing nodes as dropped and aggregates what arrived. Must exceed `transfer`.
    - `worker_start`: a node's training worker importing torch and signalling ready.
    """

    model_config = ConfigDict(extra="forbid")
    connect: float = Field(10.0, gt=0)
    request: float = Field(5.0, gt=0)
    transfer: float = Field(60.0, gt=0)
    round: float = Field(600.0, gt=0)
    worker_start: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _ordering(self) -> Timeouts:
        if self.round <= self.transfer:
            raise ValueError(f"round ({self.round}s) must be longer than transfer ({self.transfer}s)")
        return self


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """Build a config model; errors name the file and the offending key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
            lines.append(f"{source}: key '{key}': {err['msg']}")
        raise ConfigError("; ".join(lines)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: configuration file not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None


def write_toml(path: str | Path, data: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(tomli_w.dumps(_drop_none(data)), encoding="utf-8")
    tmp.replace(p)


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data
