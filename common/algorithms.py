"""What a federated algorithm asks of a node, typed and validated the same way on both sides.

Each algorithm has a name and a pydantic config that travels in a `TrainRequest` as
`AlgorithmSpec(name, config)`. The researcher builds the config (`FedAlgorithm.node_config()`), the node
validates it once on receipt with `parse_algorithm` and hands the typed object to its trainer's hooks.
An unknown name or a bad value is refused with the key named, like any other training argument.

    >>> parse_algorithm("fedprox", {"mu": 0.01})
    FedProxConfig(mu=0.01)
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import FedsiloError


class AlgorithmError(FedsiloError):
    """An algorithm name or its node-side configuration is not valid; the message names the key."""


class AlgorithmConfig(BaseModel):
    """Base of every node-side algorithm configuration (immutable, no unknown keys, finite numbers)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: ClassVar[str] = ""


class FedAvgConfig(AlgorithmConfig):
    """FedAvg, and every algorithm whose node side is plain local training (FedOpt, robust aggregation)."""

    name: ClassVar[str] = "fedavg"


class FedProxConfig(AlgorithmConfig):
    """FedProx (Li et al. 2020): the node adds (mu / 2) * ||w - w_global||^2 to its loss."""

    name: ClassVar[str] = "fedprox"
    mu: float = Field(ge=0.0)


class ScaffoldConfig(AlgorithmConfig):
    """SCAFFOLD (Karimireddy et al. 2020): gradients corrected by the control variates c - c_i; the node
    keeps c_i per experiment and returns its change (option II of the paper)."""

    name: ClassVar[str] = "scaffold"


ALGORITHMS: dict[str, type[AlgorithmConfig]] = {c.name: c for c in (FedAvgConfig, FedProxConfig, ScaffoldConfig)}
"""Node-side algorithms by name. Server-only variants (FedAdam, median, Krum, ...) send `fedavg`."""


class AlgorithmSpec(BaseModel):
    """The wire form: `{"name": "fedprox", "config": {"mu": 0.01}}`; checked against `ALGORITHMS`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "fedavg"
    config: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, config: AlgorithmConfig) -> AlgorithmSpec:
        return cls(name=config.name, config=config.model_dump(mode="json"))

    def parse(self) -> AlgorithmConfig:
        return parse_algorithm(self.name, self.config)


def parse_algorithm(name: str, config: dict[str, Any] | None = None) -> AlgorithmConfig:
    """The typed config of algorithm `name`; `AlgorithmError` naming the key otherwise."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise AlgorithmError(f"unknown algorithm '{name}'; this node knows {', '.join(sorted(ALGORITHMS))}")
    try:
        return cls.model_validate(config or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        raise AlgorithmError(f"algorithm '{name}': {where}: {first.get('msg')}") from None
