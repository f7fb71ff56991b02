"""The researcher SDK: everything a notebook needs, from one import.

    from fedsilo.researcher import DataManager, Experiment, FedProx, TorchTrainingPlan, CsvDataset

    class MyPlan(TorchTrainingPlan):
        def init_model(self, model_args):
            return torch.nn.Linear(model_args["in_features"], 2)
        def training_data(self, batch_size):
            return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)
        def training_step(self, data, target):
            return torch.nn.functional.cross_entropy(self.model()(data), target)

    exp = Experiment(tags=["diabetes"], training_plan_class=MyPlan, model_args={"in_features": 16},
                     round_limit=5, aggregator=FedProx(mu=0.01), network="run/quickstart/network")
"""

from fedsilo.common.algorithms import AlgorithmConfig, FedAvgConfig, FedProxConfig, ScaffoldConfig
from fedsilo.common.datasets import CsvDataset, ImageFolderDataset
from fedsilo.common.errors import FedsiloError, RemoteError
from fedsilo.common.training_args import TrainingArgs, TrainingArgsError
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan, TrainingPlanError

from .algorithms import (
    AggregationError,
    Aggregator,
    FedAdagrad,
    FedAdam,
    FedAlgorithm,
    FedAverage,
    FedMedian,
    FedOpt,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    NodeEvaluation,
    NodeTask,
    NodeUpdate,
    RobustAggregator,
    Scaffold,
)
from .breakpoints import BreakpointError
from .compression import Compression
from .evaluation import EvaluationFailed, EvaluationReport
from .experiment import Experiment
from .history import History, NodeResult, RoundRecord
from .requests import Requests
from .secagg import SecureAggregation
from .settings import ExperimentError
from .strategies import DefaultStrategy, Drop, RoundFailed, RoundOutcome, Strategy

__all__ = [
    "AggregationError",
    "Aggregator",
    "AlgorithmConfig",
    "BreakpointError",
    "Compression",
    "CsvDataset",
    "DataManager",
    "DefaultStrategy",
    "Drop",
    "EvaluationFailed",
    "EvaluationReport",
    "Experiment",
    "ExperimentError",
    "FedAdagrad",
    "FedAdam",
    "FedAlgorithm",
    "FedAverage",
    "FedAvgConfig",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedProxConfig",
    "FedTrimmedAvg",
    "FedYogi",
    "FedsiloError",
    "History",
    "ImageFolderDataset",
    "Krum",
    "MultiKrum",
    "NodeEvaluation",
    "NodeResult",
    "NodeTask",
    "NodeUpdate",
    "RemoteError",
    "Requests",
    "RobustAggregator",
    "RoundFailed",
    "RoundOutcome",
    "RoundRecord",
    "Scaffold",
    "ScaffoldConfig",
    "SecureAggregation",
    "Strategy",
    "TorchTrainingPlan",
    "TrainingArgs",
    "TrainingArgsError",
    "TrainingPlanError",
]
