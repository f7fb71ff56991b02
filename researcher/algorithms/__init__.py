"""Federated algorithms, researcher side: one object per experiment shapes each node's task and folds the replies.

See `base.FedAlgorithm` for the round template.
"""

from .base import AggregationError, Aggregator, FedAlgorithm, NodeTask, NodeUpdate, Params

__all__ = ["AggregationError", "Aggregator", "FedAlgorithm", "NodeTask", "NodeUpdate", "Params"]
