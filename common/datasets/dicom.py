"""A DICOM series in a modality folder, read into one volume (pydicom), as NIfTI tools would.

One folder holds the slices of exactly one series (one SeriesInstanceUID). Slices are ordered by their
position along the slice normal (ImagePositionPatient . normal), so file names and InstanceNumber do
not matter; the volume is returned as NIfTI's (x, y, z) with a RAS affine, so a DICOM node and a NIfTI
node hand plans the same array for the same scan. Only uncompressed pixel data is decoded (pydicom
needs extra codecs for JPEG variants): a compressed series is refused with its transfer syntax named.

    shape, spacing, dtype = series_header(folder, max_voxels)     # headers only
    array, affine, spacing = read_series(folder, max_voxels)      # float32, 1 x X x Y x Z
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

MAX_SLICES = 4096
"""Files a series may hold: a CT of 0.5 mm slices over 2 m is 4000."""
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_files(folder: Path, root: Path) -> list[Path]:
    """The DICOM files of `folder` (a `.dcm` suffix or the `DICM` preamble), links out of `root` left out."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not Path(os.path.realpath(p)).is_relative_to(root):
            continue
        if p.suffix.lower() == ".dcm" or _has_preamble(p):
            out.append(p)
    return out


def _has_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def series_header(folder: Path, max_voxels: int) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    """(channel-first shape, spacing, stored dtype) from the slices' headers, pixel data not read."""
    slices = _read(folder, max_voxels, pixels=False)
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    return (1, cols, rows, len(slices)), _spacing(slices), _dtype(slices[0])


def read_series(folder: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(float32 1 x X x Y x Z with the modality rescale applied, RAS affine, spacing)."""
    from .medical_tree import VolumeError

    slices = _read(folder, max_voxels, pixels=True)
    planes = []
    for s in slices:
        try:
            pixels = s.pixel_array
        except Exception as exc:  # missing codec, damaged pixel data
            syntax = getattr(getattr(s, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise VolumeError(f"cannot decode DICOM pixel data (transfer syntax {syntax}): "
                              f"{type(exc).__name__}") from None  # fmt: skip
        slope = float(getattr(s, "RescaleSlope", 1) or 1)
        intercept = float(getattr(s, "RescaleIntercept", 0) or 0)
        planes.append(pixels.astype(np.float32) * slope + intercept)
    volume = np.stack(planes, axis=-1)  # (rows, cols, z) = (y, x, z)
    volume = np.ascontiguousarray(volume.transpose(1, 0, 2))[None]
    return volume, _affine(slices), _spacing(slices)


def _read(folder: Path, max_voxels: int, pixels: bool) -> list[Any]:
    import pydicom

    from .medical_tree import VolumeError

    root = Path(os.path.realpath(folder))
    files = series_files(folder, root)
    if not files:
        raise VolumeError("no DICOM files")
    if len(files) > MAX_SLICES:
        raise VolumeError(f"{len(files)} DICOM files, over the limit of {MAX_SLICES} slices")
    slices = []
    for f in files:
        try:
            slices.append(pydicom.dcmread(str(f), stop_before_pixels=not pixels))
        except Exception as exc:  # InvalidDicomError, truncated files ...
            raise VolumeError(f"a file is not readable DICOM ({type(exc).__name__})") from None
    first = slices[0]
    for name in ("Rows", "Columns", "SeriesInstanceUID"):
        if any(getattr(s, name, None) is None for s in slices):
            raise VolumeError(f"a DICOM slice has no {name}")
    if len({s.SeriesInstanceUID for s in slices}) > 1:
        raise VolumeError(f"{len({s.SeriesInstanceUID for s in slices})} DICOM series; a modality folder holds one")
    if any((s.Rows, s.Columns) != (first.Rows, first.Columns) for s in slices):
        raise VolumeError("DICOM slices of different sizes")
    voxels = int(first.Rows) * int(first.Columns) * len(slices)
    if voxels > max_voxels:
        raise VolumeError(f"declares {voxels} voxels, over the node's limit of {max_voxels}")
    normal = _normal(first)
    return sorted(slices, key=lambda s: float(np.dot(_position(s), normal)))


def _orientation(s: Any) -> np.ndarray:
    return np.asarray([float(v) for v in getattr(s, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])


def _normal(s: Any) -> np.ndarray:
    o = _orientation(s)
    return np.cross(o[:3], o[3:])


def _position(s: Any) -> np.ndarray:
    return np.asarray([float(v) for v in getattr(s, "ImagePositionPatient", [0, 0, float(s.get("InstanceNumber", 0))])])


def _spacing(slices: list[Any]) -> tuple[float, float, float]:
    row_mm, col_mm = (float(v) for v in getattr(slices[0], "PixelSpacing", [1, 1]))
    if len(slices) > 1:
        normal = _normal(slices[0])
        z = abs(float(np.dot(_position(slices[1]) - _position(slices[0]), normal)))
    else:
        z = float(getattr(slices[0], "SliceThickness", 1) or 1)
    return round(col_mm, 4), round(row_mm, 4), round(z or 1.0, 4)


def _affine(slices: list[Any]) -> np.ndarray:
    """Voxel (x = column, y = row, z = slice) to patient LPS, then flipped to NIfTI's RAS."""
    o = _orientation(slices[0])
    col_mm, row_mm, z_mm = _spacing(slices)
    lps = np.eye(4)
    lps[:3, 0] = o[:3] * col_mm  # along a row: the column index grows
    lps[:3, 1] = o[3:] * row_mm
    lps[:3, 2] = _normal(slices[0]) * z_mm
    lps[:3, 3] = _position(slices[0])
    return _LPS_TO_RAS @ lps


def _dtype(s: Any) -> str:
    bits = int(getattr(s, "BitsAllocated", 16))
    signed = int(getattr(s, "PixelRepresentation", 0)) == 1
    return f"{'int' if signed else 'uint'}{bits}"
