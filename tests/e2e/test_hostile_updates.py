"""Updates that would poison the global model, on each broker: a hostile node with valid credentials
(NaN or infinite values, a sample count of 1e9, a 20,000-deep safetensors header) and an honest node
whose CSV has missing values. Each is dropped with its reason and the round goes on with the others."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.common.serialization import params_to_bytes
from fedsilo.common.synthetic import FEATURES, synthetic_cohort, write_cohort_csv
from fedsilo.network.messages import DatasetInfo, TrainRequest
from fedsilo.node.datasets import DatasetStore
from tests.e2e.federation import TAG, Approved, Federation, fedsilo
from tests.support.fake_node import FakeNode
from tests.support.procs import FEDSILO, NodeHandle

ROGUE_ROWS = 50
DEEP = b"[" * 20_000 + b"]" * 20_000


def update(fill: float) -> bytes:
    return params_to_bytes({"weight": torch.full((2, FEATURES), fill), "bias": torch.zeros(2)})


# name -> (payload, claimed samples, what the researcher's reason must say); "honest" is the control:
# the same node, accepted when its update is sound, so a drop is caused by the update and nothing else.
BEHAVIOURS = {
    "nan": (update(float("nan")), ROGUE_ROWS, "parameters hold NaN or infinity (weight)"),
    "inf": (update(float("inf")), ROGUE_ROWS, "parameters hold NaN or infinity (weight)"),
    "huge_count": (update(0.1), 10**9, f"claims 1000000000 training samples but reported {ROGUE_ROWS}"),
    "deep_header": (struct.pack("<Q", len(DEEP)) + DEEP, ROGUE_ROWS, "too large or too deep"),
    "honest": (update(0.1), ROGUE_ROWS, None),
}


class Rogue(FakeNode):
    behaviour = "honest"

    def __init__(self, fed: Federation) -> None:
        info = DatasetInfo(dataset_id="ds_rogue", name="rogue-cohort", tags=[TAG, "tabular"], data_type="csv",
                           shape=[ROGUE_ROWS, FEATURES + 1])  # fmt: skip
        super().__init__(fed.network, f"rogue-{fed.broker}", info, self._craft)

    def _craft(self, request: TrainRequest) -> tuple[bytes, int]:
        payload, samples, _ = BEHAVIOURS[self.behaviour]
        return payload, samples


@pytest.fixture(scope="module")
def rogue(fed: Federation) -> Iterator[Rogue]:
    node = Rogue(fed)
    yield node
    node.close()


@pytest.fixture(scope="module")
def holes(fed: Federation) -> Iterator[str]:
    """A real node daemon whose CSV has a column of missing values, registered with `--missing keep`."""
    name = f"hospital-holes-{fed.broker}"
    data = fed.root / f"data-{name}"
    data.mkdir()
    table = synthetic_cohort(np.random.default_rng(7), 64, 0.5)
    table[:, 3] = np.nan  # every row: the first batch's loss is NaN
    csv = write_cohort_csv(data / "cohort.csv", table)
    nodedir = fed.root / name
    fedsilo("node", "init", "--dir", str(nodedir), "--name", name, "--network", str(fed.netdir),
            "--data-root", str(data), "--threads", "1")  # fmt: skip
    refused = _cli_fails("node", "dataset", "add", "--dir", str(nodedir), "--name", "holes", "--tags", TAG,
                         "--type", "csv", "--path", str(csv), "--target", "label")  # fmt: skip
    assert "64 missing or non-finite values: f3 (64)" in refused, refused
    fedsilo("node", "dataset", "add", "--dir", str(nodedir), "--name", "holes", "--tags", TAG, "--type", "csv",
            "--path", str(csv), "--target", "label", "--missing", "keep")  # fmt: skip
    assert DatasetStore(nodedir).get("holes")["summary"]["missing"] == {"f3": 64}
    handle = NodeHandle(nodedir=nodedir, log_path=nodedir / "daemon.out")
    handle.start()
    yield name
    handle.stop()


def _cli_fails(*args: str) -> str:
    done = subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    return done.stdout + done.stderr


def test_poisoned_updates_are_dropped_and_rounds_go_on(fed: Federation, approved: Approved, rogue: Rogue,
                                                       tmp_path: Path) -> None:  # fmt: skip
    with fed.experiment(tmp_path, nodes=["hospital-a", rogue.name], round_limit=10) as exp:
        assert exp.training_data()[rogue.name].shape[0] == ROGUE_ROWS
        for round_index, (behaviour, (_, _, reason)) in enumerate(BEHAVIOURS.items()):
            rogue.behaviour = behaviour
            exp.run_once()
            replies = exp.training_replies()[round_index]
            assert replies["hospital-a"]["dropped"] is None, (behaviour, replies)
            dropped = replies[rogue.name]["dropped"]
            if reason is None:
                assert dropped is None, (behaviour, dropped)
                assert replies[rogue.name]["sample_size"] == ROGUE_ROWS
            else:
                assert dropped["kind"] == "invalid" and reason in dropped["reason"], (behaviour, dropped)
            params = exp.training_plan().get_parameters()
            assert all(bool(torch.isfinite(v).all()) for v in params.values()), behaviour
        assert exp.round_current() == len(BEHAVIOURS)


def test_missing_values_fail_the_round_fast_with_the_step(fed: Federation, approved: Approved, holes: str,
                                                          tmp_path: Path) -> None:  # fmt: skip
    with fed.experiment(tmp_path, nodes=["hospital-a", holes], round_limit=10) as exp:
        assert "f3 (64)" in exp.training_data()[holes].summary["warnings"][0]  # researchers see the warning
        exp.training_plan_approve(description="e2e holes")
        fedsilo("node", "plan", "approve", approved.sha256, "--dir", str(fed.root / holes), "--note", "e2e")
        exp.run_once()
        replies = exp.training_replies()[0]
    assert replies["hospital-a"]["dropped"] is None
    dropped = replies[holes]["dropped"]
    # an error reply at once (kind "error"), not a wait for the round timeout (kind "timeout")
    assert dropped["kind"] == "error" and dropped["code"] == "FS503" and dropped["stage"] == "training", dropped
    assert f"loss is nan at step 1 (epoch 1, batch 1) on node '{holes}'" in dropped["reason"], dropped
