"""What a researcher learns about a node's dataset, against real node daemons: search replies describe
without per-patient values, and a dataset smaller than the node's `[node] min_count` (5) is not trained on.

The attack: a researcher with valid credentials searches a 3-patient table in which one patient has a
unique value and a name, then asks to train on it (three replies would tell its size and more)."""

from __future__ import annotations

import json
import re

import pytest

from fedsilo.common.synthetic import FEATURES
from fedsilo.network.messages import SearchRequest
from fedsilo.node.datasets import DatasetStore
from tests.e2e.federation import MODEL_ARGS, Approved, Federation, fedsilo, zero_params
from tests.support.client import RawResearcher

pytestmark = pytest.mark.broker("embedded")  # the node is the subject here; tests/conftest.py

NODE = "hospital-a"
TAG = "tiny-privacy"
SECRETS = ("Ada Lovelace", "987.654", "porphyria")


def _register_tiny(fed: Federation) -> str:
    nodedir = fed.nodedir(NODE)
    store = DatasetStore(nodedir)
    if any(r["name"] == "tiny" for r in store.list()):
        return store.get("tiny")["dataset_id"]
    folder = store.data_roots[0]
    header = [f"f{i}" for i in range(FEATURES)] + ["dx", "label"]
    rows = [
        [*["987.654"] + ["0.1"] * (FEATURES - 1), "porphyria", "1"],
        [*["0.5"] * FEATURES, "flu", "0"],
        [*["0.7"] * FEATURES, "flu", "0"],
    ]
    (folder / "tiny.csv").write_text("\n".join(";".join(r) for r in [header, *rows]) + "\n")
    out = fedsilo("node", "dataset", "add", "--dir", str(nodedir), "--name", "tiny", "--tags", TAG,
                  "--type", "csv", "--path", str(folder / "tiny.csv"), "--target", "label")  # fmt: skip
    assert "shape [3, " in out, out
    return store.get("tiny")["dataset_id"]


def test_search_reply_describes_a_tiny_dataset_without_its_patients(fed: Federation, client: RawResearcher) -> None:
    dataset_id = _register_tiny(fed)
    reply = client.ask(NODE, SearchRequest(sender=client.party, tags=[TAG]), ("search_reply",), timeout=60)
    [info] = reply.datasets
    assert info.dataset_id == dataset_id and info.data_type == "csv"
    assert info.shape == [] and info.summary["samples"] == "< 5"  # the shape's first entry is the count
    assert info.summary["columns"]["dx"] == {"type": "categorical", "distinct": 2, "categories": {},
                                             "other": "< 5", "count": "< 5"}  # fmt: skip
    assert info.summary["columns"]["f0"] == {"type": "numeric", "dtype": "float64", "count": "< 5"}
    wire = json.dumps(reply.model_dump())
    for secret in (*SECRETS, str(fed.nodedir(NODE).parent)):
        assert secret not in wire, secret


def test_a_plan_on_a_dataset_below_min_count_is_refused(
    fed: Federation, approved: Approved, client: RawResearcher
) -> None:
    dataset_id = _register_tiny(fed)
    req = client.train_request(approved.source, "LogReg", dataset_id, params=zero_params(), model_args=MODEL_ARGS)
    client.send(NODE, req)
    err = client.wait(req.request_id, ("error", "train_reply"), timeout=120)
    assert err.kind == "error" and err.code == "FS202" and err.stage == "dataset_load", err
    assert "fewer than 5 samples" in err.message and not re.search(r"\b3\b", err.message), err.message
    # the same plan on the node's full cohort still trains: the refusal is the dataset's size
    ok = client.train_request(approved.source, "LogReg", fed.datasets[NODE], params=zero_params(),
                              model_args=MODEL_ARGS)  # fmt: skip
    client.send(NODE, ok)
    assert client.wait(ok.request_id, ("error", "train_reply"), timeout=180).kind == "train_reply"
