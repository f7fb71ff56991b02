"""The dataset-type registry: one `DatasetType` per kind of data a node can offer.

The node's CLI (`fedsilo node dataset add --type T`), the GUI's add form, the dataset store and the
daemon (search replies, loading for plans) ask this registry; none of them branches on a type name.
Adding a type is one module that subclasses `DatasetType` and calls `register`.

This module imports neither torch nor numpy: `fedsilo node dataset add` stays quick to start.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from fedsilo.common.errors import FedsiloError

FieldKind = Literal["path", "file", "text", "choice"]


class DatasetFormatError(FedsiloError):
    """A dataset's files do not have the expected layout or content."""


class UnknownDatasetType(FedsiloError, KeyError):
    """No dataset type registered under this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown dataset type"


@dataclass(frozen=True)
class FormField:
    """One option a dataset type asks for, declared once for the CLI and the GUI form.

    `kind`: "path" (a file or folder on the node, confined to the data roots), "file" (a file, same
    confinement), "text", or "choice" (one of `choices`). Path and file values reach `validate`
    resolved and already checked against the node's data roots.

        FormField("target", "Target column", "text", help="the label column")
    """

    name: str
    label: str
    kind: FieldKind = "text"
    help: str = ""
    required: bool = False
    choices: tuple[str, ...] = ()
    default: str | None = None

    @property
    def option(self) -> str:
        """The CLI option: `--index-col` for `index_col`."""
        return "--" + self.name.replace("_", "-")


@dataclass
class Validated:
    """What `DatasetType.validate` found: stored in the dataset's record.

    `shape`: samples first (rows, images, subjects). `summary`: counts, column types, shapes; kept on
    the node (it may name things a researcher must not see, e.g. subject ids with a missing file);
    `DatasetType.describe` decides what leaves. `options`: the type's options as they are to be
    stored (normalised, e.g. a sniffed delimiter). `fingerprint`: changes when the data changes.

        Validated([120, 7], {"rows": 120, "columns": {...}}, file_sha256(path), {"delimiter": ";"})
    """

    shape: list[int]
    summary: dict[str, Any]
    fingerprint: str
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class DatasetType:
    """Base of every dataset type; subclass it and `register(MyType())`.

    `path_kind`: "file" or "dir", what the dataset's main path must be. `form_fields`: the options
    beyond name, tags, path and description. A type's options arrive as a dict keyed by field name
    (missing optional ones absent or None).

        class NpyType(DatasetType):
            name, label, path_kind = "npy", "NumPy array", "file"
            def validate(self, path, options, roots=()):
                arr = numpy.load(path, mmap_mode="r")
                return Validated(list(arr.shape), {"samples": arr.shape[0]}, file_sha256(path))
            def describe(self, record, min_count):
                return {"samples": count_text(record["summary"]["samples"], min_count)}
            def loader(self, record, loading_plan=None):
                return TensorDataset(torch.from_numpy(numpy.load(record["path"])))

        register(NpyType())
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    path_kind: ClassVar[Literal["file", "dir"]] = "file"
    path_help: ClassVar[str] = ""
    path_suffixes: ClassVar[tuple[str, ...]] = ()
    """File name endings the GUI's picker offers for a "file" type (lower case); empty: any file."""
    pick_text: ClassVar[str] = ""
    """The picker's link for choosing a path as this type (default "Use as <name>")."""
    form_fields: ClassVar[tuple[FormField, ...]] = ()

    def validate(self, path: Path, options: Mapping[str, Any], roots: Sequence[Path] = ()) -> Validated:
        """Check the files against this type when the dataset is added, and summarise them.

        `path` is resolved and inside the data roots; `roots` (empty: anywhere) confine any further
        file the type opens (a symlink inside a folder, a file named in the data). Raise
        `DatasetFormatError` with a message a data manager can act on."""
        raise NotImplementedError

    def describe(self, record: Mapping[str, Any], min_count: int) -> dict[str, Any]:
        """What researchers (search replies) and the GUI see: counts, column types, shapes, never a
        value of a single patient; counts below `min_count` shown as "< min_count"."""
        raise NotImplementedError

    def loader(self, record: Mapping[str, Any], loading_plan: Any | None = None) -> Any:
        """A torch `Dataset` over the record's data, with the node's data loading plan applied when
        there is one (`loading_plan` None: the files as they are). Runs in the training worker."""
        raise NotImplementedError

    def samples(self, record: Mapping[str, Any]) -> int:
        """How many samples the dataset holds (the node's minimum-count checks use it)."""
        shape = record.get("shape") or [0]
        return int(shape[0])

    def field(self, name: str) -> FormField | None:
        return next((f for f in self.form_fields if f.name == name), None)

    def accepts(self, path: Path, is_dir: bool) -> bool:
        """Whether the picker offers `path` for this type (by kind and name only; `validate` decides)."""
        if is_dir:
            return self.path_kind == "dir"
        return self.path_kind == "file" and (not self.path_suffixes or path.name.lower().endswith(self.path_suffixes))

    @property
    def pick_label(self) -> str:
        return self.pick_text or f"Use as {self.name}"


_types: dict[str, DatasetType] = {}
RESERVED_FIELDS = frozenset({"name", "tags", "type", "data_type", "path", "description", "dir", "nodedir"})
"""What every dataset is added with; a type's own field may not take these names (the CLI would hide it)."""
_BUILTIN = ("tabular", "images", "medical_folder")
"""Modules under fedsilo.common.datasets that register a type when imported; imported on first use so
a CLI command that does not touch datasets pays nothing. A missing one is skipped (it may not exist yet)."""
_loaded = False


def register(dataset_type: DatasetType, replace: bool = False) -> DatasetType:
    """Make a type available under `dataset_type.name`; a second type under a taken name is refused."""
    name = dataset_type.name
    if not name or not isinstance(name, str):
        raise ValueError("a DatasetType needs a non-empty `name`")
    if name in _types and not replace and type(_types[name]) is not type(dataset_type):
        raise ValueError(f"a dataset type named '{name}' is already registered")
    clash = sorted({f.name for f in dataset_type.form_fields} & RESERVED_FIELDS)
    if clash:
        raise ValueError(f"dataset type '{name}': field names {', '.join(clash)} are the add form's own")
    _types[name] = dataset_type
    return dataset_type


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise


def get(name: str) -> DatasetType:
    """The registered type called `name`, or UnknownDatasetType naming the known ones."""
    _load_builtins()
    try:
        return _types[name]
    except KeyError:
        raise UnknownDatasetType(f"unknown data type '{name}'; use one of: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered type names, sorted (registration order depends on which module was imported first)."""
    _load_builtins()
    return sorted(_types)


def types() -> list[DatasetType]:
    """Registered types, sorted by name."""
    return [_types[n] for n in names()]


def option_fields() -> dict[str, FormField]:
    """Every type's fields by name (a name two types share must mean the same there), for the CLI."""
    out: dict[str, FormField] = {}
    for t in types():
        for f in t.form_fields:
            out.setdefault(f.name, f)
    return out


def load(record: Mapping[str, Any], loading_plan: Any | None = None) -> Any:
    """The torch Dataset of a dataset record (its `path` included), through its type's `loader`.

    `loading_plan`: the node's data loading plan for this dataset; None takes the record's own (the daemon
    attaches it under "loading_plan"). In a training plan:

        DataManager(load({**self.dataset, "path": self.dataset_path}), batch_size=batch_size, shuffle=True)
    """
    if loading_plan is None and record.get("loading_plan"):
        from .loading_plan import DataLoadingPlan

        loading_plan = DataLoadingPlan.parse(record["loading_plan"])
    return get(str(record.get("data_type", ""))).loader(record, loading_plan)
