"""The researcher's secure-aggregation settings: refused algorithms, defaults, and breakpoints that keep them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.credentials import Credentials, FileStoreSettings, MqttSettings
from fedsilo.network.messages import DatasetInfo
from fedsilo.researcher import Experiment, ExperimentError, FedMedian, FedYogi, Scaffold, SecureAggregation


class Tiny(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(2, 1)

    def training_data(self, batch_size):
        return DataManager(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4)), batch_size=batch_size)

    def training_step(self, data, target):
        return ((self.model()(data).squeeze(1) - target) ** 2).mean()


def _experiment(tmp_path: Path, **kw) -> Experiment:
    creds = Credentials(party="researcher", role="researcher", mqtt=MqttSettings(username="researcher", password="x"),
                        filestore=FileStoreSettings(url="http://127.0.0.1:9", token="t"))  # fmt: skip
    data = {n: DatasetInfo(dataset_id=f"ds-{n}", name=n, tags=["t"], data_type="csv", shape=[50, 2]) for n in "abc"}
    return Experiment(tags=["t"], training_plan_class=Tiny, training_data=data, round_limit=2, network=creds,
                      experimentation_folder=tmp_path, **kw)  # fmt: skip


@pytest.mark.parametrize("algorithm", [FedMedian(), Scaffold()])
def test_algorithms_needing_each_update_are_refused(tmp_path: Path, algorithm) -> None:
    with pytest.raises(ExperimentError, match="needs each node's update or extra blobs"):
        _experiment(tmp_path, aggregator=algorithm, secure_aggregation=True)


def test_defaults_and_threshold_per_neighbourhood() -> None:
    assert SecureAggregation().config_for(["a", "b", "c"]).threshold == 2
    assert SecureAggregation(degree=4).config_for([f"n{i}" for i in range(10)]).threshold == 3
    with pytest.raises(ExperimentError, match="at least 2 nodes"):
        SecureAggregation().config_for(["a"])
    with pytest.raises(ExperimentError, match="must be True, False or a SecureAggregation"):
        SecureAggregation.of("yes", FedYogi())  # type: ignore[arg-type]


def test_a_breakpoint_keeps_secure_aggregation(tmp_path: Path) -> None:
    settings = SecureAggregation(degree=2, clipping_range=4.0, fraction_bits=24)
    exp = _experiment(tmp_path, aggregator=FedYogi(), secure_aggregation=settings)
    folder = exp.breakpoint()
    resumed = Experiment.load_breakpoint(folder, network=exp._credentials)
    assert resumed._secagg == settings
    plain = _experiment(tmp_path / "plain")
    assert Experiment.load_breakpoint(plain.breakpoint(), network=plain._credentials)._secagg is None
