"""Federated algorithms, researcher side: one object per experiment shapes each node's task and folds the replies.

See `base.FedAlgorithm` for the round template. Each algorithm is one module with its paper reference:
FedAvg (`fedavg`), FedProx (`fedprox`), FedAdagrad / FedAdam / FedYogi (`fedopt`), SCAFFOLD (`scaffold`),
coordinate-wise median, trimmed mean, Krum and Multi-Krum (`robust`).

    from fedsilo.researcher import Experiment, FedProx
    exp = Experiment(..., aggregator=FedProx(mu=0.01))
"""

from .base import (
    AggregationError,
    Aggregator,
    FedAlgorithm,
    NodeEvaluation,
    NodeTask,
    NodeUpdate,
    Params,
    weighted_means,
)
from .fedavg import FedAverage, WeightedMean
from .fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from .fedprox import FedProx
from .robust import FedMedian, FedTrimmedAvg, Krum, MultiKrum, RobustAggregator
from .scaffold import Scaffold

__all__ = [
    "AggregationError",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAlgorithm",
    "FedAverage",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "NodeEvaluation",
    "NodeTask",
    "NodeUpdate",
    "Params",
    "RobustAggregator",
    "Scaffold",
    "WeightedMean",
    "weighted_means",
]
