"""The algorithms end to end: five node daemons as processes on a strongly non-IID task, each algorithm run
from the same start, with the same seeds and the same number of rounds.

The task: 10 Gaussian classes in 16 features (`synthetic_classes`), 1,500 rows split over the five nodes
by a Dirichlet(0.1) label split (`dirichlet_label_split`: most nodes hold one to three classes), softmax
regression from zero weights, 100 local steps of SGD (lr 0.3, batch 16) per round: local models drift
towards their own classes. The measure is the global model's cross-entropy on the pooled training data
(all five nodes' rows): the federated objective these algorithms minimise. The nodes train with a fixed
`random_seed`, one torch thread each, so every run of this module computes the same numbers; the margins
asserted below are those measured over several data seeds (see `SCAFFOLD_RATIO`).

One broker, the embedded one: the broker is not under test here (every other e2e module runs on both,
`conftest.fed`), and one federation of five daemons instead of two keeps the module at 84 s on this 2-core
machine (measured while other suites ran, load 6-7; 28 s of it starting the federation). This module starts
its own network: the shared federation has three nodes of another task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.common.datasets import CsvDataset
from fedsilo.common.serialization import params_from_bytes, params_to_bytes
from fedsilo.common.synthetic import FEATURES, dirichlet_label_split, synthetic_classes, write_cohort_csv
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.network.messages import DatasetInfo, TrainRequest
from fedsilo.researcher import Experiment
from fedsilo.researcher.algorithms import (
    FedAdam,
    FedAlgorithm,
    FedAverage,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Scaffold,
)
from tests.e2e.federation import TAG, Federation, fedsilo, register_and_start
from tests.support.fake_node import FakeNode
from tests.support.procs import NodeHandle, start_network

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py

NODES = [f"site-{i}" for i in range(5)]
CLASSES = 10
ROWS = 1500
ALPHA = 0.1
DATA_SEED = 3
ROUNDS = 5
TRAINING_ARGS = {"num_updates": 100, "batch_size": 16, "optimizer_args": {"lr": 0.3}, "random_seed": 1}
INITIAL_LOSS = math.log(CLASSES)  # zero weights predict every class alike

SCAFFOLD_RATIO = 0.95
"""SCAFFOLD's pooled loss must be below this fraction of FedAvg's. Measured in-process with the node's own
Trainer and hooks and the researcher's algorithms on this task (5 rounds, data seeds 0-7): SCAFFOLD / FedAvg
= 0.67 (seed 3, the one used here), 0.70, 0.72, 0.73, 0.81, 0.82, 0.91, 0.93; SCAFFOLD's accuracy was the
higher on every seed."""

FEDPROX_MEASURED = "FedProx(mu=0.01) / FedAvg pooled loss 1.04-1.07, FedProx(mu=0.1) / FedAvg 1.38-1.49"
"""Measured in-process on this task (5 rounds, data seeds 0-7); on the other label-skew variants tried
(lr 0.1-2, 50-300 steps, epochs instead of steps, 4-10 classes, overlapping classes, nodes capped at 10 steps
beside uncapped ones, a ReLU MLP) FedProx(mu in 0.01-1) was lower than FedAvg in a few runs only, never on
every seed; nor on the FedProx paper's own Synthetic(1, 1) concept shift over 5 nodes (200 steps, lr 0.05,
3 seeds: FedProx / FedAvg 1.08-1.10 at mu = 0.1, 1.22-1.46 at mu = 1; SCAFFOLD / FedAvg 0.42-0.80)."""


class SoftmaxReg(TorchTrainingPlan):
    """Multinomial logistic regression from zero weights (so that every algorithm starts from one model)."""

    classes = 10

    def init_model(self, model_args):
        model = nn.Linear(model_args["n_features"], self.classes)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model

    def training_data(self, batch_size):
        return DataManager(CsvDataset(self.dataset_path), batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.model()(data), target)


@dataclass
class Run:
    """What one experiment left: the global model after each round (round -1: the start) and its measures."""

    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss: float = math.nan
    accuracy: float = math.nan

    def movement(self) -> list[float]:
        """The distance the global model moved in each round, ||x_{t+1} - x_t||."""
        return [_distance(a, b) for a, b in zip(self.params, self.params[1:], strict=False)]


@dataclass
class Setup:
    fed: Federation
    pooled: tuple[torch.Tensor, torch.Tensor]
    rows: dict[str, int]
    runs: dict[str, Run] = field(default_factory=dict)

    def run(self, name: str, algorithm: FedAlgorithm, folder: Path, nodes: list[str] = NODES, rounds: int = ROUNDS
            ) -> Run:  # fmt: skip
        """`algorithm` for `rounds` rounds on `nodes` (kept: tests share the runs they compare)."""
        if name in self.runs:
            return self.runs[name]
        with self.fed.experiment(folder, plan=SoftmaxReg, nodes=nodes, aggregator=algorithm,
                                 training_args=TRAINING_ARGS, round_limit=rounds) as exp:  # fmt: skip
            run = Run(params=[_copy(exp.training_plan().get_parameters())])
            for _ in range(rounds):
                exp.run_once()
                replies = exp.training_replies()[exp.round_current() - 1]
                honest = [n for n in nodes if n in NODES]
                assert all(replies[n]["dropped"] is None for n in honest), replies
                run.params.append(_copy(exp.training_plan().get_parameters()))
            run.loss, run.accuracy = self.measure(exp)
        self.runs[name] = run
        return run

    def measure(self, exp: Experiment) -> tuple[float, float]:
        """(cross-entropy, accuracy) of the experiment's global model on the pooled training data."""
        x, y = self.pooled
        with torch.no_grad():
            logits = exp.training_plan().model().eval()(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("algorithms")
    network = start_network(root, broker="embedded")
    nodes: dict[str, NodeHandle] = {}
    try:
        rng = np.random.default_rng(DATA_SEED)
        table = synthetic_classes(rng, ROWS, CLASSES)
        parts = dirichlet_label_split(rng, table[:, -1].astype(np.int64), len(NODES), ALPHA, min_rows=40)
        csvs = {}
        for name, rows in zip(NODES, parts, strict=True):
            (root / f"data-{name}").mkdir()
            csvs[name] = write_cohort_csv(root / f"data-{name}" / "classes.csv", table[rows])
        ids = register_and_start(root, network.netdir, csvs, nodes)
        pooled = (
            torch.from_numpy(table[:, :FEATURES].astype(np.float32)),
            torch.from_numpy(table[:, -1].astype(np.int64)),
        )
        fed = Federation("embedded", root, network, nodes, ids, pooled)
        with fed.experiment(root / "approve", plan=SoftmaxReg, nodes=NODES) as exp:
            exp.training_plan_approve(description="e2e algorithms")
            sha = exp.training_plan_hash()
            with ThreadPoolExecutor(len(NODES)) as pool:
                list(
                    pool.map(
                        lambda n: fedsilo("node", "plan", "approve", sha, "--dir", str(root / n), "--note", "e2e"),
                        NODES,
                    )
                )
            assert exp.check_training_plan_status() == dict.fromkeys(NODES, "approved")
        yield Setup(fed, pooled, {n: len(p) for n, p in zip(NODES, parts, strict=True)})
    finally:
        with ThreadPoolExecutor(len(NODES)) as pool:  # each stop waits for its daemon: overlap them
            list(pool.map(NodeHandle.stop, nodes.values()))
        network.stop()


def _copy(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a))


# ------------------------------------------------------------------------------ drift correction
def test_the_split_is_strongly_non_iid(setup: Setup) -> None:
    # the premise of the comparisons below: every node lacks (under 5 % of its rows) at least 4 of the 10
    # classes; measured on this split: 8, 6, 7, 7 and 4 classes
    total = 0
    for name in NODES:
        labels = CsvDataset(setup.fed.root / f"data-{name}" / "classes.csv").y
        counts = torch.bincount(labels, minlength=CLASSES)
        assert int((counts < 0.05 * len(labels)).sum()) >= 4, (name, counts.tolist())
        total += len(labels)
    assert total == len(setup.pooled[1]) == ROWS


def test_scaffold_reaches_a_lower_training_loss_than_fedavg(setup: Setup, tmp_path: Path) -> None:
    fedavg = setup.run("fedavg", FedAverage(), tmp_path / "fedavg")
    scaffold = setup.run("scaffold", Scaffold(), tmp_path / "scaffold")
    print(f"pooled loss after {ROUNDS} rounds: FedAvg {fedavg.loss:.4f} (acc {fedavg.accuracy:.3f}), "
          f"SCAFFOLD {scaffold.loss:.4f} (acc {scaffold.accuracy:.3f})")  # fmt: skip
    assert fedavg.loss < 0.5 * INITIAL_LOSS  # FedAvg learns too: the comparison is between two that work
    assert scaffold.loss < SCAFFOLD_RATIO * fedavg.loss
    assert scaffold.accuracy > fedavg.accuracy


def test_fedprox_keeps_each_round_nearer_the_global_model(setup: Setup, tmp_path: Path) -> None:
    """The proximal term reaches the nodes: every round moves the global model less than FedAvg's does, and
    FedProx still learns. It does not reach a lower loss than FedAvg here (see `FEDPROX_MEASURED`): the term
    slows local progress, and label skew alone with equal local work leaves FedAvg little drift to undo."""
    fedavg = setup.run("fedavg", FedAverage(), tmp_path / "fedavg")
    prox = setup.run("fedprox", FedProx(mu=0.1), tmp_path / "fedprox")
    ratios = [p / a for p, a in zip(prox.movement(), fedavg.movement(), strict=True)]
    print(f"FedProx(mu=0.1) / FedAvg movement per round: {[round(r, 3) for r in ratios]}; pooled loss "
          f"FedProx {prox.loss:.4f}, FedAvg {fedavg.loss:.4f}")  # fmt: skip
    assert all(r < 0.95 for r in ratios), ratios
    assert prox.loss < 0.5 * INITIAL_LOSS


def test_fedprox_with_mu_zero_is_fedavg_end_to_end(setup: Setup, tmp_path: Path) -> None:
    fedavg = setup.run("fedavg", FedAverage(), tmp_path / "fedavg")
    prox0 = setup.run("fedprox-0", FedProx(mu=0.0), tmp_path / "fedprox-0", rounds=2)
    for round_index in (1, 2):
        # float64 sums over replies in arrival order, cast to float32: equal up to the last float32 bit
        assert _distance(prox0.params[round_index], fedavg.params[round_index]) < 1e-5


# ------------------------------------------------------------------------------ server optimiser
def test_fedadam_runs_and_learns(setup: Setup, tmp_path: Path) -> None:
    run = setup.run("fedadam", FedAdam(eta=0.1), tmp_path / "fedadam")
    losses = []
    for params in run.params:
        model = nn.Linear(FEATURES, CLASSES)
        model.load_state_dict(params)
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(model(setup.pooled[0]), setup.pooled[1])))
    print(f"FedAdam pooled loss per round: {[round(v, 4) for v in losses]}")
    assert losses[0] == pytest.approx(INITIAL_LOSS)
    assert losses[-1] < 0.5 * INITIAL_LOSS and run.accuracy > 0.8


# ------------------------------------------------------------------------------ one hostile node
Attack = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
ATTACKS: dict[str, Attack] = {
    # a plausible model (the global one, nudged) scaled x1e3: each coordinate is finite, none is sane
    "scaled": lambda x: {
        k: 1e3 * (v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))) for k, v in x.items()
    },
    "random": lambda x: {
        k: 100.0 * torch.randn(v.shape, generator=torch.Generator().manual_seed(6)) for k, v in x.items()
    },
}
ROBUST: dict[str, Callable[[], FedAlgorithm]] = {
    "median": FedMedian,
    "trimmed": lambda: FedTrimmedAvg(beta=0.2),  # 6 nodes: drops the highest and the lowest value
    "krum": lambda: Krum(f=1),
    "multikrum": lambda: MultiKrum(f=1, m=3),
}
HOSTILE_ROUNDS = 3


class Hostile(FakeNode):
    """A node with valid credentials that downloads the global model and answers with `attack` of it,
    claiming as many samples as the largest honest node (the most weight the researcher will accept)."""

    def __init__(self, setup: Setup) -> None:
        self.rows = max(setup.rows.values())
        info = DatasetInfo(dataset_id="ds_hostile", name="hostile", tags=[TAG, "tabular"], data_type="csv",
                           shape=[self.rows, FEATURES + 1])  # fmt: skip
        self.attack: Attack = ATTACKS["scaled"]
        super().__init__(setup.fed.network, "hostile", info, self._craft)

    def _craft(self, request: TrainRequest) -> tuple[bytes, int]:
        received = params_from_bytes(self.files.download_bytes(request.blobs["params"]))
        return params_to_bytes(self.attack(received)), self.rows


@pytest.fixture(scope="module")
def hostile(setup: Setup) -> Iterator[Hostile]:
    node = Hostile(setup)
    yield node
    node.close()


def _hostile_run(setup: Setup, hostile: Hostile, attack: str, name: str, algorithm: FedAlgorithm, folder: Path) -> Run:
    hostile.attack = ATTACKS[attack]
    return setup.run(f"{name}/{attack}", algorithm, folder, nodes=[*NODES, hostile.name], rounds=HOSTILE_ROUNDS)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_fedavg_is_carried_away_by_one_hostile_node(setup: Setup, hostile: Hostile, attack: str,
                                                     tmp_path: Path) -> None:  # fmt: skip
    # the control: the same attack does what it is meant to when nothing resists it
    run = _hostile_run(setup, hostile, attack, "fedavg", FedAverage(), tmp_path)
    assert run.loss > 5 * INITIAL_LOSS, run.loss


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("rule", sorted(ROBUST))
def test_robust_rules_keep_the_model_sane_with_one_hostile_node(setup: Setup, hostile: Hostile, rule: str,
                                                                attack: str, tmp_path: Path) -> None:  # fmt: skip
    algorithm = ROBUST[rule]()
    run = _hostile_run(setup, hostile, attack, rule, algorithm, tmp_path)
    largest = max(float(v.abs().max()) for v in run.params[-1].values())
    print(f"{rule} under a {attack} node: pooled loss {run.loss:.4f}, accuracy {run.accuracy:.3f}, "
          f"largest |parameter| {largest:.3f}")  # fmt: skip
    assert largest < 5.0, largest  # no coordinate is the attacker's (|x| ~ 1e3 or 1e2), none grew from it
    if isinstance(algorithm, MultiKrum):
        assert hostile.name not in algorithm.selected, algorithm.selected
    if rule == "krum":
        # Krum's global model is one honest node's: on a split this skewed its pooled loss (2.73 measured) is
        # above the zero model's. That is Krum on non-IID data, attacked or not; the model stays sane.
        assert run.loss < 1.5 * INITIAL_LOSS, run.loss
    else:
        assert run.loss < INITIAL_LOSS, run.loss  # it learned: median 0.93, trimmed 0.50-0.63, Multi-Krum 1.00
