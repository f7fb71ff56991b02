"""A medical folder on a real node daemon: registered with the CLI, its data loading plan set with the CLI, and a
plan written for the consortium's `T1w` trained on a node whose folders say `T1`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from fedsilo.common.errors import RemoteError
from fedsilo.common.synthetic_medical import SCANNERS, make_prostate_site
from fedsilo.common.training_plan import DataManager, TorchTrainingPlan
from fedsilo.node.audit import AuditLog
from tests.e2e.federation import Federation, fedsilo

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py

NODE = "hospital-c"
TAG = "prostate-e2e"
SUBJECTS = 6  # one without a mask: 5 train
ARGS = {"epochs": 1, "batch_size": 2, "optimizer_args": {"lr": 0.1}, "random_seed": 1, "log_interval": 1}


class TinySegmenter(TorchTrainingPlan):
    """One 3D convolution segmenting the gland on the consortium's `T1w` (MONAI dictionary transforms)."""

    def init_model(self, model_args):
        return nn.Conv3d(1, 1, kernel_size=3, padding=1)

    def training_data(self, batch_size):
        from monai.transforms import Compose, ScaleIntensityd

        from fedsilo.common.datasets.medical_folder import MedicalFolderDataset

        dataset = MedicalFolderDataset(self.dataset_path, data_modalities="T1w", target_modalities="label",
                                       transform=Compose([ScaleIntensityd(keys=["T1w"])]))  # fmt: skip
        return DataManager(dataset, batch_size=batch_size, shuffle=True)

    def training_step(self, data, target):
        logits = self.model()(data["T1w"])
        return nn.functional.binary_cross_entropy_with_logits(logits, target["label"].float())


@pytest.fixture(scope="module")
def prostate(fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> str:
    """hospital-c's prostate folder (files say `T1`, int16) registered, and TinySegmenter approved there."""
    folder = make_prostate_site(fed.root / f"data-{NODE}" / "prostate", SCANNERS[2], SUBJECTS, shape=(16, 16, 16),
                                seed=5, missing_label=1)  # fmt: skip
    assert SCANNERS[2].modality == "T1"
    nodedir = str(fed.nodedir(NODE))
    out = fedsilo("node", "dataset", "add", "--dir", nodedir, "--name", "prostate", "--tags", TAG,
                  "--type", "medical-folder", "--path", str(folder), "--demographics", str(folder / "participants.csv"),
                  "--index-col", "participant_id", "--label-modality", "label")  # fmt: skip
    assert "added" in out
    with fed.experiment(tmp_path_factory.mktemp("approve-seg"), plan=TinySegmenter, tags=[TAG]) as exp:
        assert exp.training_plan_approve(description="e2e segmentation") == {NODE: "pending"}
        fedsilo("node", "plan", "approve", exp.training_plan_hash(), "--dir", nodedir, "--note", "reviewed: e2e")
    return nodedir


def _round(fed: Federation, folder: Path, served: set[str]) -> dict:
    with fed.experiment(folder, plan=TinySegmenter, tags=[TAG], training_args=ARGS, round_limit=1) as exp:
        assert set(exp.training_data()[NODE].summary["modalities"]) == served  # the search reply's names
        exp.run()
        return exp.training_replies()[0]


def test_without_a_loading_plan_the_node_says_it_has_no_T1w(fed: Federation, prostate: str, tmp_path: Path) -> None:
    fedsilo("node", "dataset", "dlp", "clear", "--dir", prostate, "prostate")
    with pytest.raises(RemoteError, match="modality T1w is not on this node; it has: T1, label"):
        _round(fed, tmp_path, served={"T1", "label"})


def test_a_plan_asking_for_T1w_trains_on_a_node_whose_files_say_T1(fed: Federation, prostate: str,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    out = fedsilo("node", "dataset", "dlp", "set", "--dir", prostate, "prostate", "--alias", "T1=T1w", "--by", "e2e")
    assert "alias   T1 -> T1w" in out
    replies = _round(fed, tmp_path, served={"T1w", "label"})
    reply = replies[NODE]
    assert reply["dropped"] is None, reply
    assert reply["sample_size"] == SUBJECTS - 1  # the subject without a mask is left out, not a crash
    assert reply["metrics"]["steps"] == 3  # 5 subjects in batches of 2
    assert "sub-006" not in json.dumps(replies)  # researchers get the count; the node's log names the subject
    log = (Path(prostate) / "logs" / "node.log").read_text(encoding="utf-8")
    assert "1 of 6 subjects left out: sub-006: no label" in log
    changes = AuditLog(prostate).list(event="loading_plan_set")
    assert changes[-1]["actor"] == "cli:e2e" and changes[-1]["details"]["plan"]["aliases"] == {"T1": "T1w"}
