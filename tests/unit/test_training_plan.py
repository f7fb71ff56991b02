"""The training-plan runtime: a real MLP trains, arguments are honoured, DP runs, pickle is refused."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset, DatasetFormatError, ImageFolderDataset
from fedsilo.common.errors import SerializationError
from fedsilo.common.serialization import check_compatible, params_from_bytes, params_to_bytes
from fedsilo.common.training_args import TrainingArgs, TrainingArgsError
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan, TrainingPlanError
from tests.support.training import evaluate_metrics, train_metrics


class MLPPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Sequential(nn.Linear(model_args["n_features"], 16), nn.ReLU(), nn.Linear(16, 2))

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path, target="label"), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


def write_csv(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    lines = ["a,b,c,d,label"] + [",".join(f"{v:.5f}" for v in row) + f",{t}" for row, t in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_plan(csv: Path, **targs) -> MLPPlan:
    plan = MLPPlan()
    plan.dataset_path = str(csv)
    plan.post_init({"n_features": 4}, targs)
    return plan


def test_mlp_trains_and_loss_decreases(tmp_path):
    csv = write_csv(tmp_path / "d.csv")
    plan = make_plan(csv, epochs=30, batch_size=32, optimizer_args={"lr": 0.1}, log_interval=5, random_seed=1)
    dm = plan.data_manager()
    train, test = dm.split(0.2, seed=0)
    assert test is not None and len(train.dataset) == 160
    before = evaluate_metrics(plan, test)
    scalars = []
    metrics = train_metrics(plan, train, on_scalar=lambda *a: scalars.append(a))
    after = evaluate_metrics(plan, test)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.8
    assert metrics["train_s"] > 0 and metrics["epochs"] == 30
    first_loss, last_loss = scalars[0][1], scalars[-1][1]
    assert last_loss < first_loss
    key, _, step, epoch, seen, total = scalars[-1]
    assert key == "loss" and epoch == 30 and total == 160 and 0 < seen <= total and step == metrics["steps"]


def test_num_updates_wins_over_epochs(tmp_path):
    csv = write_csv(tmp_path / "d.csv", n=50)
    plan = make_plan(csv, epochs=100, num_updates=9, batch_size=8, log_interval=3)
    scalars = []
    metrics = train_metrics(plan, plan.data_manager().loader(), on_scalar=lambda *a: scalars.append(a))
    assert metrics["steps"] == 9
    assert metrics["epochs"] == 2  # 7 batches per epoch of 50 samples -> stops in the second epoch
    assert [s[2] for s in scalars] == [3, 6, 9]  # every log_interval steps; the last one is one of them


def test_dry_run_single_step(tmp_path):
    plan = make_plan(write_csv(tmp_path / "d.csv", n=50), epochs=5, dry_run=True)
    assert train_metrics(plan, plan.data_manager().loader())["steps"] == 1


def test_random_seed_makes_rounds_reproducible(tmp_path):
    csv = write_csv(tmp_path / "d.csv", n=64)
    results = []
    for _ in range(2):
        plan = make_plan(csv, epochs=2, batch_size=8, random_seed=7)
        torch.manual_seed(0)
        plan.set_parameters(make_plan(csv).get_parameters() if not results else results[0][1])
        ref = plan.get_parameters()
        train_metrics(plan, plan.data_manager().loader())
        results.append((plan.get_parameters(), ref))
    for k in results[0][0]:
        assert torch.equal(results[0][0][k], results[1][0][k])


def test_dp_runs_and_reports_epsilon(tmp_path):
    plan = make_plan(write_csv(tmp_path / "d.csv"), epochs=2, batch_size=32, dp_args={"sigma": 1.0, "clip": 1.0})
    names = set(plan.get_parameters())
    metrics = train_metrics(plan, plan.data_manager().loader())
    assert metrics["epsilon"] > 0 and np.isfinite(metrics["epsilon"])
    assert set(plan.get_parameters()) == names  # plain names after unwrapping the Opacus module


def test_params_roundtrip_and_compatibility(tmp_path):
    plan = make_plan(write_csv(tmp_path / "d.csv", n=20))
    params = plan.get_parameters()
    received = params_from_bytes(params_to_bytes(params))
    check_compatible(received, params)
    plan.set_parameters(received)
    with pytest.raises(SerializationError):
        check_compatible({k: v[..., :1] for k, v in received.items()}, params)


class _Boom:
    loaded = False

    def __reduce__(self):
        return (_mark_loaded, ())


def _mark_loaded():
    _Boom.loaded = True
    return {}


def test_pickle_payload_refused_unread():
    payload = pickle.dumps({"w": _Boom()})
    with pytest.raises(SerializationError, match="pickle"):
        params_from_bytes(payload)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with pytest.raises(SerializationError):
        params_from_bytes(buf.getvalue())
    assert _Boom.loaded is False


def test_training_args_validation():
    assert TrainingArgs.parse(None).epochs == 1
    with pytest.raises(TrainingArgsError, match="'bogus'"):
        TrainingArgs.parse({"bogus": 1})
    with pytest.raises(TrainingArgsError, match="epochs"):
        TrainingArgs.parse({"epochs": 0})
    with pytest.raises(TrainingArgsError, match="lr"):
        TrainingArgs.parse({"optimizer_args": {"lr": -1}})
    with pytest.raises(TrainingArgsError, match="sigma"):
        TrainingArgs.parse({"dp_args": {"clip": 1.0}})
    assert TrainingArgs.parse({"dp_args": {"sigma": 1, "clip": 2}}).dp_args == {
        "type": "local",
        "delta": 1e-5,
        "sigma": 1.0,
        "clip": 2.0,
    }


def test_plan_contract_errors(tmp_path):
    class NoData(TorchTrainingPlan):
        def init_model(self):
            return nn.Linear(2, 2)

        def training_data(self):
            return [1, 2, 3]

    plan = NoData()
    plan.post_init({}, {})
    with pytest.raises(TrainingPlanError, match="DataManager"):
        plan.data_manager()


def test_csv_dataset_types_and_errors(tmp_path):
    ds = CsvDataset(write_csv(tmp_path / "d.csv", n=10))
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (4,) and y.dtype == torch.int64 and len(ds) == 10
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\nx,1\n")
    with pytest.raises(DatasetFormatError, match="numeric"):
        CsvDataset(bad)
    with pytest.raises(DatasetFormatError, match="target column 'y'"):
        CsvDataset(tmp_path / "d.csv", target="y")


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 6), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    x, y = ds[4]
    assert x.shape == (3, 6, 8) and x.dtype == torch.float32 and y == 1


def test_fedbiomed_loader_args_batch_size_becomes_the_batch_size():
    assert TrainingArgs.parse({"loader_args": {"batch_size": 48, "shuffle": False}}).loader_request() == {
        "batch_size": 48,
        "shuffle": False,
    }
    assert TrainingArgs.parse({"batch_size": 48, "loader_args": {"batch_size": 48}}).batch_size == 48
    with pytest.raises(TrainingArgsError, match=re.escape("'batch_size' (32) and 'loader_args.batch_size' (48)")):
        TrainingArgs.parse({"batch_size": 32, "loader_args": {"batch_size": 48}})


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("batch_maxnum", "'num_updates'"),
        ("dp", "'dp_args'"),
        ("lr", "optimizer_args"),
        ("epoch", "did you mean 'epochs'"),
    ],
)
def test_unknown_training_argument_names_the_right_key(key, hint):
    with pytest.raises(TrainingArgsError) as info:
        TrainingArgs.parse({key: 1})
    message = str(info.value)
    assert f"'{key}'" in message and hint in message
    assert "allowed keys: batch_size, dp_args, dry_run, epochs, loader_args" in message


def _dm(**own) -> DataManager:
    return DataManager(torch.utils.data.TensorDataset(torch.zeros(10, 2), torch.zeros(10)), **own)


def test_datamanager_merge_rule():
    dm = _dm(shuffle=True)
    assert dm.apply_training_args(TrainingArgs.parse({"loader_args": {"batch_size": 5, "drop_last": True}})) == {}
    assert dm.loader_args == {"shuffle": True, "batch_size": 5, "drop_last": True}
    own = _dm(batch_size=4)
    own.apply_training_args(TrainingArgs.parse({}))
    assert own.loader_args["batch_size"] == 4  # the plan's own value, not the default 32
    plain = _dm()
    plain.apply_training_args(TrainingArgs.parse({}))
    assert plain.loader_args["batch_size"] == 32
    with pytest.raises(TrainingArgsError, match=re.escape("'loader_args.shuffle' asks shuffle=False")):
        _dm(shuffle=True).apply_training_args(TrainingArgs.parse({"loader_args": {"shuffle": False}}))


def test_datamanager_cap_is_reported_only_when_it_changes_something():
    dm = _dm(batch_size=100)
    assert dm.apply_training_args(TrainingArgs.parse({}), max_batch_size=8) == {
        "batch_size": {"requested": 100, "applied": 8}
    }
    assert dm.loader_args["batch_size"] == 8
    assert _dm().apply_training_args(TrainingArgs.parse({"batch_size": 8}), max_batch_size=8) == {}


def test_plan_builds_its_optimizer_only_when_asked(tmp_path):
    calls = []

    class Counting(MLPPlan):
        def init_optimizer(self, optimizer_args):
            calls.append(optimizer_args)
            return torch.optim.SGD(self.model().parameters(), lr=optimizer_args["lr"])

    plan = Counting()
    plan.dataset_path = str(write_csv(tmp_path / "d.csv", n=20))
    plan.post_init({"n_features": 4}, {"optimizer_args": {"lr": 0.5}})
    assert calls == [] and plan._optimizer is None  # the researcher's local plan never steps
    assert plan.optimizer() is plan.optimizer() and calls == [{"lr": 0.5}]
    assert train_metrics(plan, plan.data_manager().loader())["steps"] > 0 and len(calls) == 1


def test_bad_init_optimizer_is_reported_at_first_use():
    class Bad(MLPPlan):
        def init_optimizer(self, optimizer_args):
            return "adam"

    plan = Bad()
    plan.post_init({"n_features": 4}, {})
    with pytest.raises(
        TrainingPlanError, match=re.escape("init_optimizer must return a torch.optim.Optimizer, got str")
    ):
        plan.optimizer()


def test_seed_everything_seeds_torch_numpy_and_python_as_their_own_seeding_does() -> None:
    import random

    import numpy as np
    import torch

    from fedsilo.common.training_plan import seed_everything

    seed_everything(1234)
    ours = (torch.rand(4), torch.randperm(10), np.random.rand(3), random.random())
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    theirs = (torch.rand(4), torch.randperm(10), np.random.rand(3), random.random())
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert np.array_equal(ours[2], theirs[2]) and ours[3] == theirs[3]


def test_a_round_streams_every_log_interval_steps_and_its_last_step(tmp_path):
    csv = write_csv(tmp_path / "d.csv", n=50)
    for updates, interval, expected in [(10, 10, [10]), (9, 4, [4, 8, 9]), (3, 10, [3]), (1, 1, [1])]:
        plan = make_plan(csv, epochs=100, num_updates=updates, batch_size=8, log_interval=interval)
        scalars = []
        train_metrics(plan, plan.data_manager().loader(), on_scalar=lambda *a, out=scalars: out.append(a))
        assert [s[2] for s in scalars] == expected, (updates, interval)
