"""The researcher SDK: Experiment, aggregators, node selection, monitoring, breakpoints."""

from .aggregators import AggregationError, Aggregator, FedAverage
from .breakpoints import BreakpointError
from .experiment import Experiment, ExperimentError
from .requests import Requests
from .strategies import DefaultStrategy, Drop, RoundFailed, RoundOutcome, Strategy

__all__ = [
    "AggregationError",
    "Aggregator",
    "BreakpointError",
    "DefaultStrategy",
    "Drop",
    "Experiment",
    "ExperimentError",
    "FedAverage",
    "Requests",
    "RoundFailed",
    "RoundOutcome",
    "Strategy",
]
