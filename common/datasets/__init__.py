"""Datasets a node offers: the type registry (`registry`), the built-in types and their torch Datasets.

    from fedsilo.common.datasets import CsvDataset, get, names
    names()                      # ["csv", "images", ...]
    get("csv").form_fields       # the options `fedsilo node dataset add --type csv` takes

Torch is imported only when a torch Dataset class is first used (`CsvDataset`, `ImageFolderDataset`,
`load_image`), so the registry and the file readers stay cheap for the node's CLI.
"""

from __future__ import annotations

from typing import Any

from .registry import (
    DatasetFormatError,
    DatasetType,
    FormField,
    UnknownDatasetType,
    Validated,
    get,
    load,
    names,
    register,
    types,
)

_TORCH = {"CsvDataset", "ImageFolderDataset", "load_image"}
_READERS = {"IMAGE_EXTENSIONS": "imagefiles", "list_image_folder": "imagefiles", "load_image_array": "imagefiles",
            "read_csv": "csvfiles", "missing_counts": "csvfiles"}  # fmt: skip

__all__ = [
    "DatasetFormatError",
    "DatasetType",
    "FormField",
    "UnknownDatasetType",
    "Validated",
    "get",
    "load",
    "names",
    "register",
    "types",
    *sorted(_TORCH),
    *sorted(_READERS),
]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _TORCH:
        return getattr(importlib.import_module(f"{__name__}.torch_datasets"), name)
    if name in _READERS:
        return getattr(importlib.import_module(f"{__name__}.{_READERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
