"""The researcher's checks on a node's update, one by one (the e2e module sends them from a hostile node)."""

from __future__ import annotations

import pytest
import torch

from fedsilo.network.messages import BlobRef, DatasetInfo, TrainReply
from fedsilo.researcher.update_checks import InvalidUpdate, check_params, check_reply

INFO = DatasetInfo(dataset_id="ds_a", name="cohort", tags=["t"], data_type="csv", shape=[120, 5])


def reply(samples: int = 100, dataset_id: str = "ds_a") -> TrainReply:
    return TrainReply(sender="n", node_id="n", in_reply_to="r", job_id="j", round=0, dataset_id=dataset_id,
                      blobs={"params": BlobRef(sha256="a" * 64, size=1)}, sample_size=samples)  # fmt: skip


def test_a_sound_reply_passes() -> None:
    check_reply(reply(120), INFO)
    check_reply(reply(0), INFO)
    check_params({"w": torch.ones(3), "n": torch.tensor([1, 2]), "b": torch.tensor([True])})


@pytest.mark.parametrize(
    ("bad", "info", "match"),
    [
        (reply(121), INFO, "claims 121 training samples but reported 120 in dataset 'cohort'"),
        (reply(10**9), INFO, "claims 1000000000"),
        (reply(dataset_id="ds_b"), INFO, "replied for dataset ds_b, but was asked to train on ds_a"),
        (reply(), INFO.model_copy(update={"shape": []}), "without a sample count"),
        (reply(), None, "not asked of this node"),
    ],
    ids=["one-too-many", "1e9", "other-dataset", "no-reported-count", "not-asked"],
)
def test_replies_that_claim_too_much_are_refused(bad: TrainReply, info: DatasetInfo | None, match: str) -> None:
    with pytest.raises(InvalidUpdate, match=match):
        check_reply(bad, info)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_parameters_are_refused_by_name(value: float, dtype: torch.dtype) -> None:
    params = {f"layer{i}": torch.zeros(4, dtype=dtype) for i in range(7)}
    for i in range(7):
        params[f"layer{i}"][2] = value
    with pytest.raises(InvalidUpdate, match=r"\(layer0, layer1, layer2, layer3, layer4 and 2 more\)"):
        check_params(params)
