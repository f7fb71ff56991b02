"""The peerbench-v1 client as a fedsilo training plan (`bench/run.py` ships it to the nodes).

Its source, shipped to the nodes and approved there by sha256, imports the shared `workload` module:
the benchmark puts the workload folder on the PYTHONPATH of the node daemons it starts, so the plan
names the module but not where it lives.
"""

from __future__ import annotations

import time
from typing import Any

import workload as W
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan, TrainingPlanError


class PeerbenchPlan(TorchTrainingPlan):
    """Client k of peerbench-v1: the workload's MLP, trained by `workload.local_train` on the node's CSV shard.

    - model: `workload.build_model(size)`, so the researcher's initial global model is the workload's
      (seed 0); on a node the received global weights overwrite it.
    - data: the node's registered dataset (a CSV of the client's 2,000 rows, `label` column), read
      through fedsilo's `CsvDataset`; the node sends `len(dataset)` as the FedAvg weight.
    - client index k: from the dataset's registered name, `peerbench-client-<k>`.
    - round: fedsilo counts rounds from 0, the workload from 1, so workload round r is `self.round + 1`.
    - compute: `workload.local_train` (fresh SGD, 10 steps of batch 32 in the workload's order); its
      `train_s` is what the node reports as the round's training time.
    """

    DATASET_PREFIX = "peerbench-client-"

    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        W.client_setup()
        return W.build_model(model_args["size"])

    def training_data(self, batch_size: int) -> DataManager:
        return DataManager(CsvDataset(self.dataset_path, target="label"), batch_size=batch_size)

    def training_step(self, data: Any, target: Any) -> Any:
        """Required by the API; `local_train` runs the same loss in its own loop."""
        return nn.functional.cross_entropy(self.model()(data), target)

    def training_routine(self, loader: Any, *, on_scalar: Any = None) -> dict[str, float]:
        wall_start = time.time()
        dataset = loader.dataset
        if not isinstance(dataset, CsvDataset):
            raise TrainingPlanError("peerbench trains on the whole shard: use test_ratio 0")
        name = str(self.dataset.get("name", ""))
        if not name.startswith(self.DATASET_PREFIX):
            raise TrainingPlanError(f"dataset '{name}' is not named {self.DATASET_PREFIX}<client index>")
        k = int(name[len(self.DATASET_PREFIX) :])
        info = W.local_train(self.model(), dataset.x.numpy(), dataset.y.numpy(), k, self.round + 1)
        if info["n_examples"] != len(dataset):
            raise TrainingPlanError(f"local_train saw {info['n_examples']} rows, the dataset has {len(dataset)}")
        if on_scalar is not None:
            on_scalar("loss", info["train_loss"], W.LOCAL_STEPS, 1, len(dataset), len(dataset))
        return {
            "loss": info["train_loss"],
            "train_s": info["train_s"],
            "steps": float(W.LOCAL_STEPS),
            "wall_start": wall_start,  # wall clock (same host): the benchmark derives dispatch/return latencies
            "wall_end": time.time(),
        }
