"""What a node's update must satisfy before it is averaged into the global model.

One NaN in one update makes the weighted mean NaN everywhere, and a claimed sample count of 1e9
outweighs every honest node: either silences the federation for good. A reply is checked against what
the same node reported about the dataset when it was searched (`DatasetInfo.shape[0]`: the rows of a
CSV, the images of a folder; the node's registry fills it at registration), and its parameters must be
finite. A failed check drops the node from the round (`Drop(kind="invalid")`), the others go on.
"""

from __future__ import annotations

from fedsilo.common.errors import FedsiloError
from fedsilo.common.serialization import non_finite
from fedsilo.network.messages import DatasetInfo, EvaluateReply, TrainReply

from .aggregators import Params


class InvalidUpdate(FedsiloError):
    """A node's update is not averaged in; the message says why."""


def check_reply(reply: TrainReply | EvaluateReply, info: DatasetInfo | None) -> None:
    """Before downloading the parameters: the dataset and the sample counts are the ones the node reported
    (training and test splits are disjoint: together at most the dataset; an evaluation's count alone)."""
    if info is None:
        raise InvalidUpdate(f"replied for dataset {reply.dataset_id}, which was not asked of this node")
    if reply.dataset_id != info.dataset_id:
        raise InvalidUpdate(f"replied for dataset {reply.dataset_id}, but was asked to train on {info.dataset_id}")
    if not info.shape:
        raise InvalidUpdate(
            f"dataset '{info.name}' ({info.dataset_id}) was reported without a sample count, so the weight "
            f"this node claims ({reply.sample_size} samples) cannot be checked"
        )
    if isinstance(reply, EvaluateReply):
        claimed, what = reply.sample_size, f"{reply.sample_size} test samples"
    else:
        claimed, what = reply.sample_size + reply.test_samples, f"{reply.sample_size} training samples"
        what += f" and {reply.test_samples} test samples" if reply.test_samples else ""
    if claimed > info.shape[0]:
        raise InvalidUpdate(f"claims {what} but reported {info.shape[0]} in dataset '{info.name}' ({info.dataset_id})")


def check_params(params: Params) -> None:
    """After parsing: every floating-point value is finite."""
    bad = non_finite(params)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidUpdate(f"parameters hold NaN or infinity ({shown})")
