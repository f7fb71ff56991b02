"""The DatasetType registry: a new type plugs into the store, the CLI and descriptions by registering
itself; its options are checked (required, choices, paths confined to the data roots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from fedsilo.common.datasets import (
    DatasetType,
    FormField,
    UnknownDatasetType,
    Validated,
    get,
    names,
    register,
    registry,
)
from fedsilo.common.datasets.describe import count_text, describe_samples
from fedsilo.node.cli import node
from fedsilo.node.config import NodeConfig
from fedsilo.node.datasets import DatasetError, DatasetStore


class LinesType(DatasetType):
    """A test type: one sample per line of a text file, with a required key file beside it."""

    name = "lines-test"
    label = "Lines"
    form_fields = (
        FormField("keyfile", "Key file", "file", required=True, help="a file naming the columns"),
        FormField("mode", "Mode", "choice", choices=("a", "b"), default="a"),
    )

    def validate(self, path: Path, options: Mapping[str, Any], roots: Sequence[Path] = ()) -> Validated:
        lines = path.read_text().splitlines()
        assert isinstance(options["keyfile"], Path)  # resolved by the store before the type sees it
        return Validated([len(lines)], {"lines": len(lines)}, "fp", {"mode": options["mode"]})

    def describe(self, record: Mapping[str, Any], min_count: int) -> dict[str, Any]:
        shape, samples = describe_samples(record["shape"], min_count)
        return {"samples": samples, "shape": shape, "lines": count_text(record["summary"]["lines"], min_count)}

    def loader(self, record: Mapping[str, Any], loading_plan: Any | None = None) -> Any:
        return Path(record["path"]).read_text().splitlines()


@pytest.fixture(scope="module")
def lines_type() -> LinesType:
    t = register(LinesType())
    yield t
    registry._types.pop(t.name, None)


@pytest.fixture
def env(tmp_path: Path, lines_type: LinesType) -> tuple[Path, Path, DatasetStore]:
    root = tmp_path / "data"
    root.mkdir()
    (root / "d.txt").write_text("".join(f"row {i}\n" for i in range(7)))
    (root / "keys.txt").write_text("k\n")
    nodedir = tmp_path / "node"
    NodeConfig.create(nodedir, {"node": {"name": "n", "node_id": "n", "data_roots": [str(root)]}}).save()
    store = DatasetStore(nodedir)
    store.ensure()
    return root, nodedir, store


def test_builtin_types_are_registered() -> None:
    assert {"csv", "images"} <= set(names())
    assert get("images").path_kind == "dir" and get("csv").path_kind == "file"
    with pytest.raises(UnknownDatasetType, match="unknown data type 'nope'; use one of: csv, images, medical-folder"):
        get("nope")


def test_a_registered_type_is_added_described_and_loaded_without_other_code(env, lines_type) -> None:
    root, _, store = env
    rec = store.add("l", ["t"], "lines-test", root / "d.txt", options={"keyfile": str(root / "keys.txt")})
    assert rec["shape"] == [7] and rec["options"] == {"keyfile": str(root / "keys.txt"), "mode": "a"}
    assert store.describe(rec) == {"samples": 7, "shape": [7], "lines": 7}
    assert DatasetStore.info(rec, min_count=8).summary == {"samples": "< 8", "lines": "< 8"}
    assert DatasetStore.info(rec, min_count=8).shape == []
    assert registry.load(rec) == [f"row {i}" for i in range(7)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "data type 'lines-test' needs --keyfile"),
        ({"keyfile": "KEYS", "mode": "c"}, "--mode 'c' is not one of: a, b"),
        ({"keyfile": "KEYS", "target": "x"}, "data type 'lines-test' takes no option target"),
        ({"keyfile": "OUTSIDE"}, "outside the node's data roots"),
        ({"keyfile": "LINK"}, "outside the node's data roots"),
        ({"keyfile": "DOTDOT"}, "outside the node's data roots"),
        ({"keyfile": "DIR"}, "is not a file"),
    ],
)
def test_options_are_checked_and_paths_confined(env, tmp_path, options, message) -> None:
    """Hostile options from a valid user: a key file outside the roots, through a symlink or '..'."""
    root, _, store = env
    outside = tmp_path / "secret.txt"
    outside.write_text("s\n")
    (root / "link.txt").symlink_to(outside)
    paths = {"KEYS": root / "keys.txt", "OUTSIDE": outside, "LINK": root / "link.txt",
             "DOTDOT": root / ".." / "secret.txt", "DIR": root}  # fmt: skip
    opts = {k: str(paths.get(v, v)) for k, v in options.items()}
    with pytest.raises(DatasetError, match=message):
        store.add("l", ["t"], "lines-test", root / "d.txt", options=opts)
    assert store.list() == []


def test_the_cli_offers_a_registered_types_options(env) -> None:
    root, nodedir, store = env
    runner = CliRunner()
    r = runner.invoke(node, ["dataset", "add", "--help"])
    assert "--keyfile" in r.output and "[lines-test]" in r.output
    r = runner.invoke(node, ["dataset", "add", "--dir", str(nodedir), "--name", "l", "--tags", "t", "--type",
                             "lines-test", "--path", str(root / "d.txt"), "--keyfile", str(root / "keys.txt"),
                             "--mode", "b"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert store.get("l")["options"]["mode"] == "b"
    r = runner.invoke(node, ["dataset", "types"])
    assert "lines-test: Lines" in r.output and "--mode [a|b] (default a)" in r.output


def test_registering_a_taken_name_or_a_reserved_field_is_refused(lines_type) -> None:
    class Other(LinesType):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Other())

    class Clash(DatasetType):
        name = "clash-test"
        form_fields = (FormField("path", "Path", "path"),)

    with pytest.raises(ValueError, match="field names path are the add form's own"):
        register(Clash())
    assert "clash-test" not in names()


def test_image_classes_below_min_count_are_hidden(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, n in (("common", 6), ("rare", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (4, 3)).save(root / cls / f"{i}.png")
    store = DatasetStore(tmp_path / "node", data_roots=[str(tmp_path)])
    store.ensure()
    rec = store.add("imgs", ["t"], "images", root)
    info = DatasetStore.info(rec, min_count=5)
    assert info.summary == {"samples": 8, "classes": {"common": 6, "rare": "< 5"}, "image_shape": [1, 3, 4],
                            "dtype": "float32"}  # fmt: skip
    assert info.shape == [8, 1, 3, 4]
