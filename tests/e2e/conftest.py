"""One federation per broker (a network and three hospital node daemons, separate processes, data
registered and plans approved through the node CLI), shared by every e2e module: starting one costs
about 15 s. Tests that kill daemons start them again, so every test finds three nodes running."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from fedsilo.common.synthetic import synthetic_cohort, write_cohort_csv
from tests.e2e.federation import (
    HOSPITALS,
    ROWS,
    Approved,
    Federation,
    balanced_heldout,
    fedsilo,
    register_and_start,
)
from tests.support.brokers import BOTH
from tests.support.client import RawResearcher
from tests.support.procs import NodeHandle, start_network


@pytest.fixture(scope="session", params=BOTH)
def fed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    broker = request.param
    root = tmp_path_factory.mktemp(f"e2e-{broker}")
    network = start_network(root, broker=broker)
    nodes: dict[str, NodeHandle] = {}
    try:
        assert network.broker_kind == broker
        rng = np.random.default_rng(2024)
        csvs = {}
        for name, share in HOSPITALS.items():
            (root / f"data-{name}").mkdir()
            csvs[name] = root / f"data-{name}" / "cohort.csv"
            write_cohort_csv(csvs[name], synthetic_cohort(rng, ROWS, share))
        ids = register_and_start(root, network.netdir, csvs, nodes)
        yield Federation(broker, root, network, nodes, ids, balanced_heldout(2000))
    finally:
        for handle in nodes.values():
            handle.stop()
        network.stop()


@pytest.fixture(scope="session")
def approved(fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> Approved:
    """LogReg submitted for review by the researcher, then approved by each data manager with the CLI."""
    with fed.experiment(tmp_path_factory.mktemp("approve")) as exp:
        assert exp.training_plan_approve(description="e2e") == dict.fromkeys(HOSPITALS, "pending")
        sha = exp.training_plan_hash()
        for name in HOSPITALS:
            out = fedsilo("node", "plan", "approve", sha, "--dir", str(fed.nodedir(name)), "--note", "reviewed: e2e")
            assert "approved" in out
        assert exp.check_training_plan_status() == dict.fromkeys(HOSPITALS, "approved")
        return Approved(sha, exp.training_plan_file())


@pytest.fixture(scope="session")
def client(fed: Federation) -> Iterator[RawResearcher]:
    researcher = RawResearcher.for_network(fed.network)
    yield researcher
    researcher.close()
