"""Dataset classes a training plan uses on a node: a CSV table and a class-per-folder image tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .csvfiles import read_csv
from .imagefiles import IMAGE_EXTENSIONS, list_image_folder, load_image_array
from .registry import DatasetFormatError
from .table_arrays import served_names, table_arrays
from .tables import read_table

__all__ = [
    "IMAGE_EXTENSIONS",
    "CsvDataset",
    "DatasetFormatError",
    "ImageFolderDataset",
    "list_image_folder",
    "load_image",
    "read_csv",
]


class CsvDataset(Dataset):
    """A CSV table: features as float32, the `target` column as int64 (class labels).

    Numeric columns only by default; `encode=True` codes categorical and date columns (see
    `fedsilo.common.datasets.tables`: dates as days since 1970-01-01, labels by their index in sorted
    order), `categories={"SEX": ["F", "M"]}` fixes a column's codes the same on every node. `delimiter`
    None: sniffed. `missing`: "keep" (NaN reaches the plan), "drop-rows" or "refuse". The node's data
    loading plan (`loading_plan`, or later `set_dlp`) renames columns, maps target labels and may set
    the missing-value policy; names given here are the served ones.

        CsvDataset(self.dataset_path, target="DX", features=["AGE", "SEX"], categories={"SEX": ["F", "M"]},
                   missing="drop-rows")
    """

    def __init__(
        self,
        path: str | Path,
        target: str = "label",
        features: Sequence[str] | None = None,
        *,
        delimiter: str | None = None,
        categories: Mapping[str, Sequence[str]] | None = None,
        encode: bool = False,
        missing: str = "keep",
        loading_plan: Any | None = None,
    ) -> None:
        self.path = Path(path)
        self.target = target
        self._features = list(features) if features is not None else None
        self.delimiter, self.categories, self.encode, self.missing = delimiter, categories, encode, missing
        self.loading_plan = loading_plan
        self._build()

    def _build(self) -> None:
        table = read_table(self.path, self.delimiter, self._local_categories(), copy=False)
        x, y, facts = table_arrays(table, self.target, self._features, encode=self.encode, missing=self.missing,
                                   loading_plan=self.loading_plan, where=str(self.path))  # fmt: skip
        self.columns = served_names(table, self.loading_plan)
        self.features = facts["features"]
        self.rows_dropped = facts["rows_dropped"]
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(y.astype(np.int64))

    def _local_categories(self) -> dict[str, Sequence[str]] | None:
        if not self.categories:
            return None
        renames = getattr(self.loading_plan, "renames", None) or {}
        served_to_local = {served: local for local, served in renames.items()}
        return {served_to_local.get(c, c): labels for c, labels in self.categories.items()}

    def set_dataset_parameters(self, options: Mapping[str, Any]) -> None:
        """The options the node registered the file with (its delimiter, its missing-value policy)."""
        self.delimiter = options.get("delimiter") or self.delimiter
        if options.get("missing") in ("refuse", "drop-rows"):
            self.missing = str(options["missing"])
        self._build()

    def set_dlp(self, loading_plan: Any) -> None:
        """Apply the node's data loading plan (renames, label map, missing-value policy)."""
        self.loading_plan = loading_plan
        self._build()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a float32 CHW tensor in [0, 1] (grey stays 1 channel, others become RGB)."""
    return torch.from_numpy(load_image_array(path))


class ImageFolderDataset(Dataset):
    """Images in one subfolder per class; items are (CHW float tensor or `transform(tensor)`, class index)."""

    def __init__(self, path: str | Path, transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.path = Path(path)
        self.classes, self.samples = list_image_folder(self.path)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        f, target = self.samples[i]
        x = load_image(f)
        if self.transform is not None:
            x = self.transform(x)
        return x, target
