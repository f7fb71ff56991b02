"""Real clinical tables: a semicolon file like Fed-BioMed's pseudo-ADNI tutorial, categorical and date
columns, empty cells; the summary is typed, researchers see types and counts only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.common.datasets import CsvDataset, DatasetFormatError, get, load
from fedsilo.common.datasets.tables import read_table, sniff_delimiter
from fedsilo.node.cli import node
from fedsilo.node.datasets import DatasetError, DatasetStore

# Pseudo-ADNI's layout (Fed-BioMed's tutorial): ';' separated, a subject id, a sex column, a visit date.
ADNI = """RID;AGE;PTGENDER;EXAMDATE;MMSE;WholeBrain.bl;DX
1001;71.2;F;2010-03-04;28;1.02e6;CN
1002;65.0;M;2011-05-06;;0.98e6;MCI
1003;80.1;M;2012-07-08;22;0.91e6;AD
1004;;F;2013-09-10;29;1.05e6;CN
1005;77.7;F;NA;27;1.01e6;CN
1006;69.3;M;2014-01-02;26;0.99e6;MCI
1007;73.4;F;2014-02-03;30;1.07e6;CN
1008;68.8;M;2014-03-04;25;0.95e6;MCI
1009;79.9;F;2014-04-05;21;0.90e6;AD
1010;70.0;M;2014-05-06;29;1.03e6;CN
1011;66.6;F;2014-06-07;28;1.00e6;CN
1012;75.5;M;2014-07-08;24;0.94e6;MCI
"""


@pytest.fixture
def adni(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "adni.csv"
    path.parent.mkdir()
    path.write_text(ADNI, encoding="utf-8")
    return path


def test_semicolons_are_sniffed_and_columns_typed(adni: Path) -> None:
    assert sniff_delimiter(adni) == ";"
    t = read_table(adni)
    assert t.kinds == {"RID": "numeric", "AGE": "numeric", "PTGENDER": "categorical", "EXAMDATE": "date",
                       "MMSE": "numeric", "WholeBrain.bl": "numeric", "DX": "categorical"}  # fmt: skip
    assert t.labels["PTGENDER"] == ["F", "M"] and t.label_counts["DX"] == {"AD": 2, "CN": 6, "MCI": 4}
    assert t.missing() == {"AGE": 1, "EXAMDATE": 1, "MMSE": 1}
    assert t.data[0, t.columns.index("EXAMDATE")] == 14672.0  # 2010-03-04 in days since 1970-01-01


def test_registration_refuses_then_keeps_or_drops_rows_with_empty_cells(tmp_path: Path, adni: Path) -> None:
    store = DatasetStore(tmp_path / "node", data_roots=[str(adni.parent)])
    store.ensure()
    with pytest.raises(DatasetError, match=r"3 missing or non-finite values: AGE \(1\), EXAMDATE \(1\), MMSE \(1\)"):
        store.add("adni", ["adni"], "csv", adni, target="DX")
    kept = store.add("adni", ["adni"], "csv", adni, options={"target": "DX", "missing": "keep"})
    assert kept["shape"] == [12, 7] and kept["options"] == {"target": "DX", "delimiter": ";", "missing": "keep"}
    assert kept["summary"]["columns"]["PTGENDER"] == {"type": "categorical", "distinct": 2,
                                                      "labels": {"F": 6, "M": 6}, "rest": 0}  # fmt: skip
    assert kept["summary"]["columns"]["EXAMDATE"] == {"type": "date", "format": "%Y-%m-%d"}
    dropped = store.add("adni-complete", ["adni"], "csv", adni, options={"target": "DX", "missing": "drop-rows"})
    assert dropped["shape"] == [9, 7] and dropped["summary"]["rows_dropped"] == 3


def test_an_explicit_delimiter_overrides_the_sniffer(tmp_path: Path, adni: Path) -> None:
    store = DatasetStore(tmp_path / "node", data_roots=[str(adni.parent)])
    store.ensure()
    with pytest.raises(DatasetError, match="target column 'DX' is not in the CSV; columns: RID;AGE;PTGENDER"):
        store.add("x", ["t"], "csv", adni, options={"delimiter": ",", "target": "DX"})  # one column of text
    with pytest.raises(DatasetError, match="one character"):
        store.add("x", ["t"], "csv", adni, options={"delimiter": ";;"})
    for hostile in ('"', "\0", "x"):
        with pytest.raises(DatasetError, match=r"is not one of: , ; \| : space tab"):
            store.add("x", ["t"], "csv", adni, options={"delimiter": hostile})
    assert store.list() == []
    for hostile in ("\n", "\r"):  # the csv module raises TypeError on these: a clear error instead
        with pytest.raises(DatasetFormatError, match="is not one of"):
            read_table(adni, hostile)
    tabs = adni.with_name("adni.tsv")
    tabs.write_text(ADNI.replace(";", "\t"))
    assert store.add("tsv", ["t"], "csv", tabs, options={"delimiter": "tab", "missing": "keep"})["shape"] == [12, 7]


def test_loader_encodes_categoricals_and_dates_the_documented_way(tmp_path: Path, adni: Path) -> None:
    store = DatasetStore(tmp_path / "node", data_roots=[str(adni.parent)])
    store.ensure()
    rec = store.add("adni", ["adni"], "csv", adni, options={"target": "DX", "missing": "drop-rows"})
    ds = load(rec)  # the registry's loader, as the worker would build it
    assert len(ds) == 9 and ds.rows_dropped == 3
    assert ds.features == ["RID", "AGE", "PTGENDER", "EXAMDATE", "MMSE", "WholeBrain.bl"]
    x, y = ds[0]
    assert x[2].item() == 0.0 and x[3].item() == 14672.0 and y.item() == 1  # F, 2010-03-04, CN among AD<CN<MCI


def test_plain_csvdataset_refuses_text_columns_unless_asked(adni: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"must be numeric: PTGENDER \(categorical\), EXAMDATE \(date\)"):
        CsvDataset(adni, target="MMSE", features=["AGE", "PTGENDER", "EXAMDATE"])
    ds = CsvDataset(adni, target="MMSE", features=["AGE"], missing="drop-rows")
    assert len(ds) == 10
    with pytest.raises(DatasetFormatError, match="missing or non-finite"):
        CsvDataset(adni, target="MMSE", features=["AGE"], missing="refuse")


def test_fixed_categories_give_every_node_the_same_codes(tmp_path: Path) -> None:
    # A node that has only M patients would code M as 0 by sorted labels; the plan's list makes it 1 everywhere.
    only_m = tmp_path / "m.csv"
    only_m.write_text("sex,label\nM,0\nM,1\n")
    both = tmp_path / "b.csv"
    both.write_text("sex,label\nF,0\nM,1\n")
    assert CsvDataset(only_m, encode=True).x[:, 0].tolist() == [0.0, 0.0]  # sorted local labels: shifted
    cats = {"sex": ["F", "M"]}
    assert CsvDataset(only_m, categories=cats).x[:, 0].tolist() == [1.0, 1.0]
    assert CsvDataset(both, categories=cats).x[:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(DatasetFormatError, match="1 row\\(s\\) whose label is not in the categories"):
        CsvDataset(both, categories={"sex": ["M"]})


def test_description_has_types_and_counts_but_no_values(tmp_path: Path, adni: Path) -> None:
    store = DatasetStore(tmp_path / "node", data_roots=[str(adni.parent)])
    store.ensure()
    rec = store.add("adni", ["adni"], "csv", adni, options={"target": "DX", "missing": "keep"})
    info = DatasetStore.info(rec, min_count=5)
    cols = info.summary["columns"]
    assert cols["AGE"] == {"type": "numeric", "dtype": "float64", "count": 11}
    assert cols["DX"] == {"type": "categorical", "distinct": 3, "categories": {"CN": 6}, "other": 6, "count": 12}
    assert cols["RID"] == {"type": "numeric", "dtype": "int64", "count": 12}
    assert info.summary["missing"] == {"AGE": "< 5", "EXAMDATE": "< 5", "MMSE": "< 5"}
    text = json.dumps({k: v for k, v in info.model_dump().items() if k != "dataset_id"})  # random hex: "1001" too
    for value in ("1001", "71.2", "80.1", "2010", "MCI", 'AD"', "1.07e6", "1070000"):
        assert value not in text, value


def test_a_three_row_table_with_a_unique_patient_value_describes_nothing_of_it(tmp_path: Path) -> None:
    """Attack: a dataset of 3 patients, one with a rare diagnosis and an identifying name."""
    root = tmp_path / "data"
    root.mkdir()
    path = root / "tiny.csv"
    path.write_text("name,age,dx,label\nAda Lovelace,36,porphyria,1\nBob,71,flu,0\nCy,52,flu,0\n")
    store = DatasetStore(tmp_path / "node", data_roots=[str(root)])
    store.ensure()
    rec = store.add("tiny", ["t"], "csv", path, target="label")
    info = DatasetStore.info(rec, min_count=5)
    # the dataset's id is random hex, which holds "36" or "52" now and then (it failed a suite run so)
    text = json.dumps({k: v for k, v in info.model_dump().items() if k != "dataset_id"})
    for value in ("Ada", "Lovelace", "porphyria", "flu", "36", "71", "52"):
        assert value not in text, value
    assert info.shape == [] and info.summary["samples"] == "< 5"
    assert info.summary["columns"]["name"] == {"type": "categorical", "distinct": 3, "categories": {},
                                               "other": "< 5", "count": "< 5"}  # fmt: skip


def test_cli_adds_a_semicolon_table_with_type_options(tmp_path: Path, adni: Path) -> None:
    runner = CliRunner()
    nodedir = tmp_path / "node"
    store = DatasetStore(nodedir, data_roots=[str(adni.parent)])
    store.ensure()
    from fedsilo.node.config import NodeConfig

    NodeConfig.create(nodedir, {"node": {"name": "n", "node_id": "n", "data_roots": [str(adni.parent)]}}).save()
    r = runner.invoke(node, ["dataset", "add", "--dir", str(nodedir), "--name", "adni", "--tags", "adni", "--type",
                             "csv", "--path", str(adni), "--target", "DX", "--missing", "drop-rows"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "shape [9, 7]" in r.output
    r = runner.invoke(node, ["dataset", "show", "--dir", str(nodedir), "adni", "--public"])
    assert r.exit_code == 0 and '"samples": 9' in r.output and "1001" not in r.output, r.output
    r = runner.invoke(node, ["dataset", "add", "--dir", str(nodedir), "--name", "i", "--tags", "t", "--type",
                             "images", "--path", str(adni.parent), "--target", "DX"])  # fmt: skip
    assert r.exit_code == 1 and "data type 'images' takes no option target" in r.output, r.output


def test_csv_type_is_registered_with_its_fields() -> None:
    t = get("csv")
    assert [f.name for f in t.form_fields] == ["target", "delimiter", "missing"]
    assert t.field("missing").choices == ("refuse", "keep", "drop-rows")


def test_the_nodes_loading_plan_renames_columns_and_maps_labels_for_plans(tmp_path: Path, adni: Path) -> None:
    """The consortium's plan asks for `sex` and `diagnosis` coded 0/1/2; this node's file says PTGENDER and DX."""
    from fedsilo.common.datasets.loading_plan import DataLoadingPlan, bind
    from fedsilo.node.loading_plans import LoadingPlanStore, attach

    nodedir = tmp_path / "node"
    store = DatasetStore(nodedir, data_roots=[str(adni.parent)])
    store.ensure()
    rec = store.add("adni", ["adni"], "csv", adni, options={"target": "DX", "missing": "keep"})
    plan = DataLoadingPlan(renames={"PTGENDER": "sex", "DX": "diagnosis"}, label_map={"CN": 0, "MCI": 1, "AD": 2},
                           missing="drop")  # fmt: skip
    LoadingPlanStore(nodedir).set("adni", plan, by="test")
    record = attach(store.get("adni"), nodedir)  # what the daemon hands the worker
    ds = load(record)
    assert "sex" in ds.columns and "PTGENDER" not in ds.columns and len(ds) == 9  # "drop": incomplete rows left out
    assert ds[0][1].item() == 0 and sorted(set(ds.y.tolist())) == [0, 1, 2]  # CN -> 0 whatever the local codes
    # A plan that built its own CsvDataset with the served names gets the same data once the worker binds it.
    own = CsvDataset(adni, target="DX", features=["AGE", "PTGENDER"], encode=True, missing="drop-rows")
    assert own.y.tolist()[:2] == [1, 2]  # local codes: AD < CN < MCI
    served = CsvDataset(adni, target="diagnosis", features=ds.features, encode=True,
                        loading_plan=DataLoadingPlan.parse(record["loading_plan"]))  # fmt: skip
    bind(served, record)
    assert served.y.tolist() == ds.y.tolist() and "sex" in served.features
    assert rec["dataset_id"] == record["dataset_id"]


def test_a_wide_table_is_described_within_one_message(tmp_path: Path) -> None:
    """Hostile or just wide: 300 columns of 30 frequent labels must not push a search reply past 256 KiB."""
    from fedsilo.network.messages import MAX_MESSAGE_BYTES, SearchReply

    root = tmp_path / "data"
    root.mkdir()
    header = ";".join(f"item_{i:03d}" for i in range(300))
    rows = [";".join(f"option-{(r + i) % 30:02d}" for i in range(300)) for r in range(300)]
    (root / "wide.csv").write_text("\n".join([header, *rows]) + "\n")
    store = DatasetStore(tmp_path / "node", data_roots=[str(root)])
    store.ensure()
    rec = store.add("wide", ["t"], "csv", root / "wide.csv")
    infos = [DatasetStore.info(rec, 5)] * 4  # four such datasets answer one search
    reply = SearchReply(sender="n", node_id="n", in_reply_to="r", datasets=infos)
    assert len(reply.model_dump_json()) < MAX_MESSAGE_BYTES
    assert infos[0].summary["columns_not_described"] == 200 and infos[0].shape == [300, 300]
    assert len(infos[0].summary["columns"]["item_000"]["categories"]) == 20


def test_dates_are_day_first_and_impossible_dates_are_not_dates(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("visit,bad,label\n03/04/2020,2021-02-30,0\n31/12/2020,2021-01-01,1\n")
    t = read_table(path)
    assert t.kinds == {"visit": "date", "bad": "categorical", "label": "numeric"}
    assert t.date_formats["visit"] == "%d/%m/%Y" and t.data[:, 0].tolist() == [18355.0, 18627.0]  # 3 April, 31 Dec


def test_the_delimiter_is_sniffed_once_per_file_version(tmp_path, monkeypatch) -> None:
    """The sniffer ran in every round's CsvDataset (7 ms); a rewritten file is sniffed again."""
    import csv as csv_module
    import os

    from fedsilo.common.datasets import tables

    path = tmp_path / "t.csv"
    path.write_text("a;b;label\n1;2;0\n3;4;1\n", encoding="utf-8")
    calls = []
    real = csv_module.Sniffer.sniff
    monkeypatch.setattr(csv_module.Sniffer, "sniff", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert tables.sniff_delimiter(path) == ";" and tables.sniff_delimiter(path) == ";"
    assert len(calls) == 1
    path.write_text("a,b,label\n1,2,0\n3,4,1\n5,6,0\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))  # even with an mtime that went back: the size and the inode's version differ
    assert tables.sniff_delimiter(path) == "," and len(calls) == 2
