"""Reading a medical folder without torch: the subject/modality tree, volume headers and volumes.

    root/
      demographics.csv          (optional; any file at the top level is not a subject)
      sub-01/T1/scan.nii.gz     one folder per subject, one sub-folder per modality holding exactly one
      sub-01/label/mask.nii.gz  NIfTI file (.nii or .nii.gz) or one DICOM series (`dicom.py`)
      sub-02/T1/...

The node's registry validates a folder with `scan_tree` and `read_header` (headers only: a 40-subject
tree is summarised without decoding a voxel); the training worker reads volumes with `read_volume`.
Nothing here follows a link out of the dataset's folder, and no volume larger than `MAX_VOXELS` is
decoded: a 350-byte header may declare a volume of 10^15 voxels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.errors import FedsiloError

from . import dicom

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_VOXELS = 1 << 28
"""Voxels per volume (x channels) a node decodes: 268 M, a 1 GiB float32 array. A 512 x 512 x 1000 CT is
262 M; the prostate MR volumes of Fed-BioMed's paper are under 10 M."""


class VolumeError(FedsiloError):
    """A volume cannot be read; the message names the reason, never a voxel value."""


@dataclass(frozen=True)
class Source:
    """Where one modality of one subject lives: a NIfTI file or a DICOM series folder."""

    path: Path
    kind: str  # "nifti" | "dicom"


@dataclass(frozen=True)
class Header:
    """A volume's geometry as its header declares it: channel-first shape, voxel spacing (mm), dtype."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    dtype: str


@dataclass
class Subject:
    """One subject folder: its usable modalities and, per unusable modality folder, the reason."""

    name: str
    sources: dict[str, Source] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


@dataclass
class Tree:
    """A scanned medical folder: subjects by folder name (sorted), the modality names seen anywhere.

        tree = scan_tree("/data/prostate"); tree.subjects["sub-001"].sources["T1"].path
    """

    root: Path
    subjects: dict[str, Subject]

    @property
    def modalities(self) -> list[str]:
        names = {m for s in self.subjects.values() for m in [*s.sources, *s.problems]}
        return sorted(names)


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, every link resolved, lies in `root` (itself resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root)
    except (OSError, ValueError):
        return False


def scan_tree(root: str | Path) -> Tree:
    """The subject and modality folders under `root`; entries that are hidden, not folders, or lead out of
    the tree are not subjects (a link out of a modality folder is recorded as that modality's problem)."""
    base = Path(os.path.realpath(root))
    if not base.is_dir():
        raise VolumeError(f"'{root}' is not a folder")
    subjects: dict[str, Subject] = {}
    for sub in _entries(base):
        if not sub.is_dir() or not inside(sub, base):
            continue
        subject = Subject(sub.name)
        for mod in _entries(sub):
            if not mod.is_dir():
                continue
            if not inside(mod, base):
                subject.problems[mod.name] = "links outside the dataset folder"
                continue
            try:
                subject.sources[mod.name] = _modality_source(mod, base)
            except VolumeError as exc:
                subject.problems[mod.name] = str(exc)
        if subject.sources or subject.problems:
            subjects[sub.name] = subject
    return Tree(base, subjects)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _modality_source(folder: Path, root: Path) -> Source:
    nifti = [p for p in _entries(folder) if p.name.lower().endswith(NIFTI_SUFFIXES)]
    if len(nifti) > 1:
        raise VolumeError(f"{len(nifti)} NIfTI files; a modality folder holds one volume")
    if nifti:
        if not inside(nifti[0], root):
            raise VolumeError("links outside the dataset folder")
        if not nifti[0].is_file():  # a FIFO (or a link to one) would block the reader for good
            raise VolumeError("not a regular file")
        return Source(nifti[0], "nifti")
    if dicom.series_files(folder, root):
        return Source(folder, "dicom")
    raise VolumeError("no NIfTI file or DICOM series")


def read_header(source: Source) -> Header:
    """The volume's geometry from its header alone; `VolumeError` for a file that is not what it claims,
    is truncated, has more than 4 dimensions, or declares more than `MAX_VOXELS`."""
    if source.kind == "dicom":
        shape, spacing, dtype = dicom.series_header(source.path, MAX_VOXELS)
        return Header(shape, spacing, dtype)
    img = _nifti(source.path)
    return _nifti_header(img, source.path)


def read_volume(source: Source) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(float32 array channel-first C x D x H x W, 4x4 affine, spacing); the header is checked first."""
    if source.kind == "dicom":
        return dicom.read_series(source.path, MAX_VOXELS)
    img = _nifti(source.path)
    header = _nifti_header(img, source.path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel and zlib raise many types for a damaged file
        raise VolumeError(f"cannot decode the volume: {type(exc).__name__}") from None
    data = _channel_first(data.reshape(_squeezed(data.shape)))
    if not np.isfinite(data).all():
        raise VolumeError("the volume holds NaN or infinite voxels")
    return np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64), header.spacing


def _nifti(path: Path) -> Any:
    import nibabel  # 0.7 s: paid only by commands that read volumes

    try:
        img = nibabel.load(str(path))
    except Exception as exc:  # ImageFileError, HeaderDataError, OSError, gzip errors ...
        raise VolumeError(f"not a readable NIfTI file ({type(exc).__name__})") from None
    if not isinstance(img, nibabel.Nifti1Image | nibabel.Nifti2Image):
        raise VolumeError(f"not a NIfTI image but {type(img).__name__}")
    return img


def _nifti_header(img: Any, path: Path) -> Header:
    shape = _squeezed(tuple(int(n) for n in img.shape))
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        raise VolumeError(f"declares a {len(shape)}-dimensional shape; 2 to 4 dimensions are read")
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise VolumeError(f"declares {voxels} voxels, over the node's limit of {MAX_VOXELS}")
    dtype = img.get_data_dtype()
    if not path.name.lower().endswith(".gz"):
        needed = int(getattr(img.dataobj, "offset", 0)) + voxels * dtype.itemsize
        if path.stat().st_size < needed:
            raise VolumeError(f"truncated: {path.stat().st_size} bytes, its header needs {needed}")
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    channels = (shape[3],) if len(shape) == 4 else (1,)
    return Header(channels + shape[:3], zooms, str(dtype))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """NIfTI pads to 5-D with 1s ((x, y, z, 1, c) for vector volumes): drop size-1 axes after the third."""
    head, tail = list(shape[:3]), [n for n in shape[3:] if n != 1]
    return tuple(head + tail)


def _channel_first(data: np.ndarray) -> np.ndarray:
    """NIfTI stores (x, y, z[, t]); MONAI wants (C, x, y, z): a 4th axis becomes the channels."""
    if data.ndim == 4:
        return np.moveaxis(data, 3, 0)
    return data[None]
