"""The peerbench-v1 client as a fedsilo training plan (`bench/run.py` ships it to the nodes).

Self-contained: `bench/federation.py` writes a copy of this file whose `WORKLOAD_SOURCE` holds the text of
the shared `workload.py`, so the source the nodes receive, and approve by sha256, carries the exact workload
code it runs. The plan used to `import workload` from a PYTHONPATH the benchmark gave the node daemons; the
worker's sandbox binds only Python, the venv and fedsilo (`node/sandbox.py` `python_paths`), so that import
failed in every sandboxed round, and a module outside the approved source would escape the data manager's
review anyway.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan, TrainingPlanError


class PeerbenchPlan(TorchTrainingPlan):
    """Client k of peerbench-v1: the workload's MLP and its local training, run by the node's own trainer.

    - model: `workload.build_model(size)`, so the researcher's initial global model is the workload's
      (seed 0); on a node the received global weights overwrite it.
    - data: the node's registered dataset (a CSV of the client's 2,000 rows, `label` column), read
      through fedsilo's `CsvDataset`, then put in the order `workload.local_train` draws it: the first
      LOCAL_STEPS x BATCH_SIZE rows of the permutation seeded by SeedSequence([7, k, r]). With
      `epochs=1`, `batch_size=32` and no shuffling the node's trainer takes exactly the workload's 10 steps.
    - optimiser: the default, a fresh `SGD(lr)` each round, as `local_train`'s.
    - client index k: from the dataset's registered name, `peerbench-client-<k>`.
    - round: fedsilo counts rounds from 0, the workload from 1, so workload round r is `self.round + 1`.
    - FedAvg weight: the node counts the samples it trained on (320 on every client, where the workload
      reports 2,000): the weights are equal either way, so the aggregate is the same.
    """

    DATASET_PREFIX = "peerbench-client-"
    WORKLOAD_SOURCE = ""  # workload.py's text, written in by bench/federation.py `plan_class`

    @classmethod
    def workload(cls) -> types.ModuleType:
        """The workload module, executed from `WORKLOAD_SOURCE` once per process."""
        module = sys.modules.get("peerbench_workload")
        if module is None:
            if not cls.WORKLOAD_SOURCE:
                raise TrainingPlanError("WORKLOAD_SOURCE is empty: build the plan with bench/federation.py plan_class")
            module = types.ModuleType("peerbench_workload")
            # A name in <>: linecache does not look for it along sys.path each time torch formats a stack (torch's
            # manual_seed does, on a machine without CUDA): 10 stat calls per frame, twice a seed.
            exec(compile(cls.WORKLOAD_SOURCE, "<peerbench-v1 workload.py>", "exec"), module.__dict__)
            sys.modules["peerbench_workload"] = module
        return module

    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        W = self.workload()
        W.client_setup()
        return W.build_model(model_args["size"])

    def training_data(self, batch_size: int) -> DataManager:
        W = self.workload()
        if batch_size != W.BATCH_SIZE:
            raise TrainingPlanError(f"peerbench trains with batch size {W.BATCH_SIZE}, not {batch_size}")
        name = str(self.dataset.get("name", ""))
        if not name.startswith(self.DATASET_PREFIX):
            raise TrainingPlanError(f"dataset '{name}' is not named {self.DATASET_PREFIX}<client index>")
        k = int(name[len(self.DATASET_PREFIX) :])
        shard = CsvDataset(self.dataset_path, target="label")
        rng = np.random.default_rng([W.BATCH_SEED_BASE, k, self.round + 1])
        order = torch.from_numpy(rng.permutation(len(shard))[: W.LOCAL_STEPS * W.BATCH_SIZE])
        return DataManager(TensorDataset(shard.x[order], shard.y[order]), batch_size=batch_size, shuffle=False)

    def training_step(self, data: Any, target: Any) -> Any:
        return nn.functional.cross_entropy(self.model()(data), target)
