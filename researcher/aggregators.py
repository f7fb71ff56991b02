"""Compatibility module: the aggregators now live in `fedsilo.researcher.algorithms`.

`from fedsilo.researcher.aggregators import FedAverage` (and `Aggregator`, `AggregationError`, `Params`)
keeps working; new code imports from `fedsilo.researcher` or `fedsilo.researcher.algorithms`.
"""

from .algorithms import (
    AggregationError,
    Aggregator,
    FedAdagrad,
    FedAdam,
    FedAlgorithm,
    FedAverage,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    NodeTask,
    NodeUpdate,
    Params,
    Scaffold,
)

__all__ = [
    "AggregationError",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAlgorithm",
    "FedAverage",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "NodeTask",
    "NodeUpdate",
    "Params",
    "Scaffold",
]
