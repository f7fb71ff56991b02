"""Dataset classes a training plan uses on a node: a numeric CSV table and a class-per-folder image tree."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .csvfiles import read_csv
from .imagefiles import IMAGE_EXTENSIONS, list_image_folder, load_image_array
from .registry import DatasetFormatError

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
    """A numeric CSV: features as float32, the `target` column as int64 (class labels)."""

    def __init__(self, path: str | Path, target: str = "label", features: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        columns, data = read_csv(self.path)
        if target not in columns:
            raise DatasetFormatError(f"{self.path}: target column '{target}' not found; columns: {columns}")
        if features is None:
            features = [c for c in columns if c != target]
        missing = [c for c in features if c not in columns]
        if missing:
            raise DatasetFormatError(f"{self.path}: feature columns not found: {missing}")
        self.columns = columns
        self.target = target
        self.features = list(features)
        idx = [columns.index(c) for c in self.features]
        self.x = torch.from_numpy(np.ascontiguousarray(data[:, idx], dtype=np.float32))
        self.y = torch.from_numpy(data[:, columns.index(target)].astype(np.int64))

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
