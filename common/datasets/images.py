"""The `images` dataset type: a folder with one subfolder of image files per class.

    fedsilo node dataset add --type images --path mednist/

Registration lists every file (each must stay inside the node's data roots, symlinks included) and
reads the first image's shape; the fingerprint covers names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .describe import describe_samples, suppressed_counts
from .imagefiles import list_image_folder, load_image_array
from .registry import DatasetFormatError, DatasetType, Validated, register


class ImagesType(DatasetType):
    """Class-per-subfolder image files (png, jpeg, tiff, ...); see the module doc."""

    name = "images"
    label = "Images (one folder per class)"
    path_kind = "dir"
    path_help = "a folder holding one subfolder of images per class"
    pick_text = "Use as image folder"

    def validate(self, path: Path, options: Mapping[str, Any], roots: Sequence[Path] = ()) -> Validated:
        if not path.is_dir():
            raise DatasetFormatError(
                f"'{path}' is a file but data type 'images' needs a folder with one subfolder per class"
            )
        classes, samples = list_image_folder(path)
        h = hashlib.sha256()
        for f, _ in samples:
            real = f.resolve()
            if roots and not any(real.is_relative_to(r) for r in roots):
                raise DatasetFormatError(f"'{f}' links to {real}, outside the node's data roots")
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        counts = {c: 0 for c in classes}
        for _, i in samples:
            counts[classes[i]] += 1
        try:
            first = list(load_image_array(samples[0][0]).shape)
        except Exception as exc:  # pillow raises many types for unreadable files
            raise DatasetFormatError(f"'{samples[0][0]}' is not a readable image: {exc}") from None
        summary = {"classes": counts, "image_shape": first, "images": len(samples), "dtype": "float32"}
        return Validated([len(samples), *first], summary, h.hexdigest())

    def describe(self, record: Mapping[str, Any], min_count: int) -> dict[str, Any]:
        """Classes are folder names the node chose; their counts below `min_count` are shown as "< N"."""
        summary = record.get("summary") or {}
        shape, samples = describe_samples(record.get("shape") or [], min_count)
        return {
            "samples": samples,
            "shape": shape,
            "classes": suppressed_counts(summary.get("classes") or {}, min_count),
            "image_shape": list(summary.get("image_shape") or []),
            "dtype": summary.get("dtype", "float32"),
        }

    def loader(self, record: Mapping[str, Any], loading_plan: Any | None = None) -> Any:
        from .torch_datasets import ImageFolderDataset

        return ImageFolderDataset(record["path"])


register(ImagesType())
