"""The researcher SDK: Experiment, aggregators, node selection, monitoring, breakpoints."""

from .aggregators import AggregationError, Aggregator, FedAverage
from .breakpoints import BreakpointError
from .experiment import Experiment
from .requests import Requests
from .settings import ExperimentError
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
