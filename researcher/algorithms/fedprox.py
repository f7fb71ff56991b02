"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

Each node minimises its loss plus the proximal term (mu / 2) * ||w - w_t||^2, which keeps its local model
near the global model w_t it was sent; the node's trainer adds the term (`FedProxConfig(mu)` travels in
the request). The server side is FedAvg. mu = 0 is plain FedAvg; the paper tunes mu in {0.001, 0.01, 0.1, 1}.

    from fedsilo.researcher import Experiment, FedProx
    exp = Experiment(..., aggregator=FedProx(mu=0.01))
"""

from __future__ import annotations

from typing import Any

from fedsilo.common.algorithms import FedProxConfig, parse_algorithm

from .fedavg import FedAverage


class FedProx(FedAverage):
    """FedAvg on the server; every node trains with the proximal term (mu / 2) * ||w - w_global||^2.

    FedProx(mu=0.01)
    """

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        super().__init__()
        # validated here as on the node (mu >= 0, finite): AlgorithmError names the key
        config = parse_algorithm(FedProxConfig.name, {"mu": mu})
        assert isinstance(config, FedProxConfig)
        self._config = config

    @property
    def mu(self) -> float:
        return self._config.mu

    def node_config(self) -> FedProxConfig:
        return self._config

    def settings(self) -> dict[str, Any]:
        return {"mu": self.mu}
