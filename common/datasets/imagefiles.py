"""Class-per-folder image trees without torch: listing and reading image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .registry import DatasetFormatError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def list_image_folder(path: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted subfolder names) and (file, class index) samples of a class-per-subfolder tree."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples: list[tuple[Path, int]] = []
    for i, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((f, i))
    if not classes or not samples:
        raise DatasetFormatError(f"{root}: expected one subfolder per class holding image files")
    return classes, samples


def load_image_array(path: str | Path) -> np.ndarray:
    """An image file as a float32 CHW array in [0, 1] (grey stays 1 channel, others become RGB)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L") if img.mode in ("L", "1", "I;16", "I", "F") else img.convert("RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None, :, :] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
