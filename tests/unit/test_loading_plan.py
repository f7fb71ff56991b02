"""Data loading plans: the typed plan, its checks against a dataset, how the dataset applies it, the node's
store (audited), and `fedsilo node dataset dlp set|show|clear`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedsilo.common.datasets import DatasetFormatError, get
from fedsilo.common.datasets.loading_plan import DataLoadingPlan, DataLoadingPlanError, bind
from fedsilo.common.datasets.medical_folder import MedicalFolderDataset
from fedsilo.node.audit import AuditLog
from fedsilo.node.cli import node
from fedsilo.node.datasets import DatasetStore, UnknownDataset
from fedsilo.node.loading_plans import LoadingPlanStore, attach
from tests.unit.test_medical_folder import SHAPE, demographics, subject, volume


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A node whose folders say `T1` and whose masks code the gland as 2; sub-3 has no demographics row."""
    root = tmp_path / "data" / "prostate"
    for i in (1, 2, 3):
        subject(root, f"sub-{i}", seed=i)
        mask = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.uint8)  # values 0, 1, 2
        volume(root / f"sub-{i}" / "label" / f"sub-{i}_label.nii.gz", mask)
    demographics(root, ["sub-1,61,M", "sub-2,70,F"], header="participant_id,Age,Sex")
    return root


@pytest.fixture
def store(tmp_path: Path, tree: Path) -> tuple[LoadingPlanStore, dict]:
    nodedir = tmp_path / "node"
    record = DatasetStore(nodedir).add("prostate", ["prostate"], "medical-folder", tree, added_by="cli:admin",
                                       options={"demographics": str(tree / "participants.csv"),
                                                "index_col": "participant_id", "label_modality": "label"})  # fmt: skip
    return LoadingPlanStore(nodedir), record


# ------------------------------------------------------------------------------------------ applied
def test_an_alias_serves_the_node_s_T1_folder_as_T1w(tree):
    asked = MedicalFolderDataset(tree, "T1w", target_modalities="label")
    with pytest.raises(DatasetFormatError, match="modality T1w is not on this node; it has: T1, label"):
        len(asked)
    asked.set_dlp(DataLoadingPlan(aliases={"T1": "T1w"}))
    data, _ = asked[0]
    assert set(data) == {"T1w"} and data["T1w"].shape == (1, *SHAPE)
    alias = DataLoadingPlan(aliases={"T1": "T1w"})
    hidden = MedicalFolderDataset(tree, "T1", target_modalities="label", loading_plan=alias)
    with pytest.raises(DatasetFormatError, match="modality T1 is not on this node; it has: T1w, label"):
        len(hidden)  # the local name is no longer served: every node of the consortium looks the same


def test_the_label_map_changes_the_target_only_and_all_at_once(tree):
    dlp = DataLoadingPlan(label_map={"1": 2, "2": 1})  # a swap: applied value by value it would undo itself
    data, target = MedicalFolderDataset(tree, "T1", target_modalities="label", loading_plan=dlp)[0]
    _, plain = MedicalFolderDataset(tree, "T1", target_modalities="label")[0]
    swapped = plain["label"].clone()
    swapped[plain["label"] == 1], swapped[plain["label"] == 2] = 2, 1
    assert np.array_equal(target["label"].numpy(), swapped.numpy())
    assert float(data["T1"].max()) > 2  # the image is not a target: untouched


def test_renames_and_the_missing_value_policy_apply_to_the_demographics(tree):
    table = {"demographics": tree / "participants.csv", "index_col": "participant_id"}
    drop = MedicalFolderDataset(tree, "T1", target_modalities=None, **table,
                                loading_plan=DataLoadingPlan(renames={"Age": "age", "Sex": "sex"}))  # fmt: skip
    assert drop.subjects == ["sub-1", "sub-2"] and drop[0][0]["demographics"] == {"age": 61.0, "sex": "M"}
    keep = MedicalFolderDataset(tree, "T1", target_modalities=None, **table,
                                loading_plan=DataLoadingPlan(missing="keep"))  # fmt: skip
    row = keep[2][0]["demographics"]
    assert keep.subjects == ["sub-1", "sub-2", "sub-3"] and np.isnan(row["Age"]) and row["Sex"] == ""
    refuse = MedicalFolderDataset(tree, "T1", target_modalities=None, **table,
                                  loading_plan=DataLoadingPlan(missing="refuse"))  # fmt: skip
    with pytest.raises(DatasetFormatError, match="1 of 3 subjects lack") as err:
        len(refuse)
    assert "sub-3" not in str(err.value)  # the message may reach a researcher: a count, no id


def test_bind_gives_a_plan_s_dataset_the_registered_table_and_the_node_s_plan(store):
    _, record = store
    ds = MedicalFolderDataset(record["path"], "T1w", target_modalities="label")  # as a plan writes it
    bind(ds, {**record, "loading_plan": {"aliases": {"T1": "T1w"}, "renames": {"Age": "age"}}})
    data, _ = ds[0]
    assert data["demographics"] == {"age": 61.0, "Sex": "M"} and ds.subjects == ["sub-1", "sub-2"]
    from_type = get("medical-folder").loader(record, DataLoadingPlan(aliases={"T1": "T1w"}))
    assert from_type.data_modalities == ["T1w"] and from_type.target_modalities == ["label"] and len(from_type) == 2


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(("plan", "message"), [
    ({"aliases": {"T1": "../../etc"}}, "aliases: modality name '../../etc'"),
    ({"aliases": {"T1/x": "T1w"}}, "modality name 'T1/x'"),
    ({"aliases": {"T1": "T1w", "T2": "T1w"}}, "T1w served for more than one local name"),
    ({"renames": {"age": "a\nb"}}, "column name 'a\\nb'"),
    ({"label_map": {"1": float("nan")}}, "use a finite number"),
    ({"label_map": {str(i): i for i in range(257)}}, "at most 256 items"),
    ({"missing": "ignore"}, "missing: Input should be 'drop', 'refuse' or 'keep'"),
    ({"aliasses": {"T1": "T1w"}}, "aliasses: Extra inputs are not permitted"),
])  # fmt: skip
def test_malformed_plans_are_refused_naming_the_entry(plan, message):
    with pytest.raises(DataLoadingPlanError, match="data loading plan") as err:
        DataLoadingPlan.parse(plan)
    assert message in str(err.value)


def test_a_plan_is_checked_against_the_dataset_it_is_for(store):
    _, record = store
    DataLoadingPlan(aliases={"T1": "T1w"}, renames={"Age": "age"}, label_map={"2": 1}).check(record)
    for plan, message in [
        ({"aliases": {"T2": "T2w"}}, "aliases: no modality T2 in this dataset (it has: T1, label)"),
        ({"aliases": {"T1": "label"}}, "aliases: label is already a modality"),
        ({"renames": {"age": "years"}}, "renames: no column age in this dataset (it has: Age, Sex)"),
        ({"renames": {"Age": "Sex"}}, "renames: Sex is already a column"),
        ({"label_map": {"gland": 1}}, "label_map: 'gland' -> 1 is not number -> number"),
    ]:
        with pytest.raises(DataLoadingPlanError) as err:
            DataLoadingPlan.parse(plan).check(record)  # type: ignore[union-attr]
        assert message in str(err.value)
    DataLoadingPlan(aliases={"T1": "label", "label": "mask"}).check(record)  # a rename chain is fine


# ------------------------------------------------------------------------------------------ the store
def test_the_store_keeps_one_plan_per_dataset_and_audits_every_change(store):
    plans, record = store
    assert plans.get("prostate") is None and attach(record, plans.nodedir) is record
    plans.set("prostate", {"aliases": {"T1": "T1w"}}, by="cli:alice")
    plans.set(record["dataset_id"], DataLoadingPlan(aliases={"T1": "T1w"}, missing="drop"), by="gui:bob")
    assert plans.get("prostate") == DataLoadingPlan(aliases={"T1": "T1w"}, missing="drop")
    assert attach(record, plans.nodedir)["loading_plan"] == {"aliases": {"T1": "T1w"}, "renames": {},
                                                             "label_map": {}, "missing": "drop"}  # fmt: skip
    assert plans.clear("prostate", by="gui:bob") is True and plans.clear("prostate", by="gui:bob") is False
    assert plans.get("prostate") is None
    events = [(e["event"], e["actor"], e["details"].get("previous")) for e in AuditLog(plans.nodedir).list()
              if e["event"].startswith("loading_plan")]  # fmt: skip
    first = {"aliases": {"T1": "T1w"}, "renames": {}, "label_map": {}, "missing": None}
    assert events == [("loading_plan_set", "cli:alice", None), ("loading_plan_set", "gui:bob", first),
                      ("loading_plan_cleared", "gui:bob", {**first, "missing": "drop"})]  # fmt: skip


def test_a_plan_that_does_not_fit_is_refused_and_nothing_is_stored(store):
    plans, _ = store
    plans.set("prostate", {"aliases": {"T1": "T1w"}})
    with pytest.raises(DataLoadingPlanError, match="no modality T3"):
        plans.set("prostate", {"aliases": {"T3": "T1w"}})
    with pytest.raises(UnknownDataset):
        plans.set("no-such-dataset", {"aliases": {"T1": "T1w"}})
    assert plans.get("prostate") == DataLoadingPlan(aliases={"T1": "T1w"})
    assert [e["event"] for e in AuditLog(plans.nodedir).list()].count("loading_plan_set") == 1


def test_a_tampered_store_file_is_a_clear_error_not_a_silent_plan(store):
    plans, record = store
    plans.set("prostate", {"aliases": {"T1": "T1w"}})
    path = plans.nodedir / "db" / "loading_plans.json"
    data = json.loads(path.read_text())
    row = next(iter(data["loading_plans"].values()))
    row["plan"]["aliases"] = {"T1": "../../../etc"}
    path.write_text(json.dumps(data))
    with pytest.raises(DataLoadingPlanError, match="modality name"):
        attach(record, plans.nodedir)


def test_researchers_see_the_served_names(store):
    plans, record = store
    plans.set("prostate", {"aliases": {"T1": "T1w"}, "renames": {"Age": "age"}})
    described = DatasetStore.info(attach(record, plans.nodedir)).summary
    assert set(described["modalities"]) == {"T1w", "label"}
    assert described["demographics"]["columns"] == {"age": "numeric", "Sex": "categorical"}


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_sets_extends_shows_and_clears_a_plan(store):
    plans, _ = store
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(node, ["dataset", "dlp", *args[:1], "--dir", str(plans.nodedir), *args[1:]])

    r = run("set", "prostate", "--alias", "T1=T1w", "--label-map", "2=1", "--missing", "drop", "--by", "alice")
    assert r.exit_code == 0, r.output
    r = run("set", "prostate", "--rename", "Age=age")
    assert r.exit_code == 0, r.output
    assert plans.get("prostate") == DataLoadingPlan(aliases={"T1": "T1w"}, renames={"Age": "age"},
                                                    label_map={"2": 1}, missing="drop")  # fmt: skip
    shown = run("show", "prostate").output
    assert "alias   T1 -> T1w" in shown and "rename  Age -> age" in shown and "label   2 -> 1" in shown
    r = run("set", "prostate", "--replace", "--alias", "T1=T1w")
    assert plans.get("prostate") == DataLoadingPlan(aliases={"T1": "T1w"})
    assert AuditLog(plans.nodedir).list(event="loading_plan_set")[0]["actor"] == "cli:alice"
    r = run("set", "prostate", "--alias", "T1")
    assert r.exit_code == 2 and "write LOCAL=SERVED" in r.output
    r = run("set", "prostate", "--alias", "T9=T9w")
    assert r.exit_code == 1 and "no modality T9" in r.output
    assert run("clear", "prostate").output.strip() == "cleared"
    assert "no data loading plan" in run("show", "prostate").output


def test_the_sandbox_binds_a_demographics_table_kept_outside_the_folder(tmp_path, tree):
    from fedsilo.node.sandbox import dataset_paths

    table = tmp_path / "data" / "tables" / "participants.csv"
    table.parent.mkdir()
    (tree / "participants.csv").rename(table)
    record = DatasetStore(tmp_path / "node").add("p2", ["p"], "medical-folder", tree, options={
        "demographics": str(table), "index_col": "participant_id"})  # fmt: skip
    assert dataset_paths(record) == [str(tree), str(table)]


def test_pairs_typed_in_a_form_or_on_the_command_line():
    from fedsilo.common.datasets.loading_plan import label_value, parse_pairs

    assert parse_pairs(["T1=T1w", " T2 = T2w "], "alias") == {"T1": "T1w", "T2": "T2w"}
    for bad in ("T1", "=T1w", "T1=", " = "):
        with pytest.raises(DataLoadingPlanError, match=f"alias: {bad.strip()!r}: write LOCAL=SERVED"):
            parse_pairs([bad], "alias")
    assert [label_value(t) for t in ("1", "0.5", "gland")] == [1, 0.5, "gland"]
