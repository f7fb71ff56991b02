"""The `medical-folder` dataset type: BIDS-like NIfTI (or DICOM) trees with a demographics table.

    fedsilo node dataset add --dir NODE --name prostate --tags prostate,mri --type medical-folder \\
        --path /data/prostate --demographics /data/prostate/participants.csv --index-col participant_id \\
        --label-modality label

Registration reads every volume's header (never its voxels): the summary counts subjects, modalities,
shapes, spacings and dtypes, and names on the node (only) the subjects that lack a modality or a
demographics row and the files that cannot be read. Researchers see counts (`describe`).
Plans use `MedicalFolderDataset` (imported from here; it loads torch on first use):

    from fedsilo.common.datasets.medical_folder import MedicalFolderDataset
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .demographics import read_demographics
from .describe import count_text, describe_categories, describe_samples
from .loading_plan import DataLoadingPlan
from .medical_tree import MAX_VOXELS, Tree, VolumeError, read_header, scan_tree
from .registry import DatasetFormatError, DatasetType, FormField, Validated, register
from .tabular import MAX_DESCRIBED_COLUMNS

MAX_DESCRIBED_MODALITIES = 20
"""Modalities a description names (the most common); a search reply is one 256 KiB message. Measured: 5,000
modality folders (one subject each) and 1,000 demographics columns describe in 6.6 KB with these caps, 1.1 MB
without."""


class MedicalFolderType(DatasetType):
    """One folder per subject, one sub-folder per modality (see `medical_tree.py`); options: a demographics
    CSV keyed by `index_col`, and which modality holds labels or masks.

        get("medical-folder").validate(Path("/data/prostate"), {"demographics": csv, "index_col": "id"})
    """

    name = "medical-folder"
    label = "Medical folder (NIfTI / DICOM per subject and modality)"
    path_kind = "dir"
    path_help = "the folder holding one sub-folder per subject, each with one sub-folder per modality"
    form_fields = (
        FormField("demographics", "Demographics CSV", "file", help="one row per subject (optional)"),
        FormField("index_col", "Subject id column", "text", help="the demographics column naming subject folders"),
        FormField("label_modality", "Label/mask modality", "text", help="the modality holding masks (optional)"),
    )

    def validate(self, path: Path, options: Mapping[str, Any], roots: Sequence[Path] = ()) -> Validated:
        try:
            tree = scan_tree(path)
        except VolumeError as exc:
            raise DatasetFormatError(str(exc)) from None
        if not tree.subjects:
            raise DatasetFormatError(f"'{path}' holds no subject folder with modality sub-folders "
                                     "(subject/modality/volume.nii.gz)")  # fmt: skip
        label = (options.get("label_modality") or "").strip() or None
        if label is not None and label not in tree.modalities:
            raise DatasetFormatError(f"label modality '{label}' is not in the folder; it has: "
                                     f"{', '.join(tree.modalities)}")  # fmt: skip
        summary, files = _summarise(tree)
        summary["label_modality"] = label
        stored: dict[str, Any] = {"label_modality": label}
        demographics = options.get("demographics")
        if demographics:
            index_col = (options.get("index_col") or "").strip()
            if not index_col:
                raise DatasetFormatError("a demographics file needs --index-col, the column naming subject folders")
            summary["demographics"] = _demographics_summary(Path(demographics), index_col, tree)
            stored.update(demographics=str(demographics), index_col=index_col)
            files.append(Path(demographics))
        elif options.get("index_col"):
            raise DatasetFormatError("--index-col names a column of the demographics file; give --demographics too")
        return Validated([len(tree.subjects)], summary, _fingerprint(files), stored, _warnings(summary))

    def describe(self, record: Mapping[str, Any], min_count: int) -> dict[str, Any]:
        summary = record.get("summary") or {}
        dlp = DataLoadingPlan.parse(record.get("loading_plan")) or DataLoadingPlan()
        shape, samples = describe_samples(record.get("shape") or [], min_count)
        # the most common first: DICOM exports may name a series folder per subject
        modalities = sorted((summary.get("modalities") or {}).items(), key=lambda kv: (-kv[1]["subjects"], kv[0]))
        out: dict[str, Any] = {
            "samples": samples,
            "shape": shape,
            "subjects": samples,
            "complete": count_text(summary.get("complete", 0), min_count),
            "incomplete": count_text(len(summary.get("incomplete", {})), min_count),
            "unreadable": count_text(len(summary.get("unreadable", {})), min_count),
            "modalities": {dlp.served_modality(m): {
                "subjects": count_text(info["subjects"], min_count),
                **{k: _geometry(info[k], min_count) for k in ("shapes", "spacings", "dtypes")},
            } for m, info in modalities[:MAX_DESCRIBED_MODALITIES]},
        }  # fmt: skip
        if len(modalities) > MAX_DESCRIBED_MODALITIES:
            out["modalities_not_described"] = len(modalities) - MAX_DESCRIBED_MODALITIES
        if summary.get("label_modality"):
            out["label_modality"] = dlp.served_modality(summary["label_modality"])
        demo = summary.get("demographics")
        if demo:
            columns = list(demo["columns"].items())
            out["demographics"] = {
                "columns": {dlp.served_column(c): k for c, k in columns[:MAX_DESCRIBED_COLUMNS]},
                "subjects_without_row": count_text(len(demo["subjects_without_row"]), min_count),
            }
            if len(columns) > MAX_DESCRIBED_COLUMNS:
                out["demographics"]["columns_not_described"] = len(columns) - MAX_DESCRIBED_COLUMNS
        warnings = _warnings(summary, min_count)
        if warnings:
            out["warnings"] = warnings
        return out

    def loader(self, record: Mapping[str, Any], loading_plan: Any | None = None) -> Any:
        """Every modality but the label one as data, the label modality (if registered) as target."""
        dlp = loading_plan if isinstance(loading_plan, DataLoadingPlan) else DataLoadingPlan.parse(loading_plan)
        dlp = dlp or DataLoadingPlan()
        summary = record.get("summary") or {}
        label = summary.get("label_modality")
        data = [dlp.served_modality(m) for m in summary.get("modalities", {}) if m != label]
        target = [dlp.served_modality(label)] if label else None
        from .medical_dataset import MedicalFolderDataset

        return MedicalFolderDataset.from_record(record, dlp, data_modalities=data, target_modalities=target)


def _geometry(counts: Mapping[str, int], min_count: int) -> dict[str, Any]:
    """Shapes, spacings or dtypes with their subject counts; values fewer than `min_count` subjects share are
    counted together as `other` (a rare field of view can single a patient out)."""
    described = describe_categories(counts, min_count)
    described.pop("type", None)
    return described


def _summarise(tree: Tree) -> tuple[dict[str, Any], list[Path]]:
    """Counts per modality (subjects, shapes, spacings, dtypes), incomplete subjects and unreadable files
    by id (kept on the node), and the files read (for the fingerprint)."""
    modalities = {m: {"subjects": 0, "shapes": Counter(), "spacings": Counter(), "dtypes": Counter()}
                  for m in tree.modalities}  # fmt: skip
    unreadable: dict[str, dict[str, str]] = {}
    files: list[Path] = []
    complete = 0
    incomplete: dict[str, list[str]] = {}
    for subject in tree.subjects.values():
        problems = dict(subject.problems)
        for m, source in subject.sources.items():
            try:
                header = read_header(source)
            except VolumeError as exc:
                problems[m] = str(exc)
                continue
            info = modalities[m]
            info["subjects"] += 1
            info["shapes"]["x".join(map(str, header.shape))] += 1
            info["spacings"]["x".join(f"{s:g}" for s in header.spacing)] += 1
            info["dtypes"][header.dtype] += 1
            files.extend(sorted(source.path.iterdir()) if source.kind == "dicom" else [source.path])
        if problems:
            unreadable[subject.name] = problems
        lacking = [m for m in tree.modalities if m not in subject.sources or m in problems]
        if lacking:
            incomplete[subject.name] = lacking
        else:
            complete += 1
    summary = {
        "subjects": len(tree.subjects),
        "complete": complete,
        "modalities": {m: {k: dict(v) if isinstance(v, Counter) else v for k, v in info.items()}
                       for m, info in modalities.items()},
        "incomplete": incomplete,
        "unreadable": unreadable,
        "max_voxels": MAX_VOXELS,
    }  # fmt: skip
    return summary, files


def _demographics_summary(path: Path, index_col: str, tree: Tree) -> dict[str, Any]:
    table = read_demographics(path, index_col)
    return {
        "index_col": index_col,
        "columns": table.columns,
        "rows": len(table.rows),
        "subjects_without_row": sorted(set(tree.subjects) - set(table.rows)),
        "rows_without_subject": len(set(table.rows) - set(tree.subjects)),
        "duplicates": table.duplicates,
    }


def _warnings(summary: Mapping[str, Any], min_count: int = 0) -> list[str]:
    """What a data manager (and, with `min_count`, a researcher) should know, in counts: the ids stay in the
    node's summary."""
    def n(k: int) -> int | str:
        return count_text(k, min_count) if min_count else k

    out = []
    total = n(summary.get("subjects", 0))
    lacking = Counter(m for mods in summary.get("incomplete", {}).values() for m in mods)
    if lacking:
        per = ", ".join(f"{m}: {n(k)}" for m, k in sorted(lacking.items()))
        out.append(f"{n(len(summary['incomplete']))} of {total} subjects lack a modality ({per}); plans asking for "
                   "it leave them out")  # fmt: skip
    if summary.get("unreadable"):
        out.append(f"{n(len(summary['unreadable']))} subjects have a volume that cannot be read")
    demo = summary.get("demographics")
    if demo and demo["subjects_without_row"]:
        out.append(f"{n(len(demo['subjects_without_row']))} of {total} subjects have no demographics row")
    if demo and demo["duplicates"]:
        out.append(f"{n(len(demo['duplicates']))} subject ids appear on more than one demographics row; "
                   "those rows are not used")  # fmt: skip
    return out


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def __getattr__(name: str) -> Any:
    # MedicalFolderDataset imports torch (4 s here): loaded when a plan first names it, not by the node's CLI.
    if name == "MedicalFolderDataset":
        from .medical_dataset import MedicalFolderDataset

        return MedicalFolderDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register(MedicalFolderType())

__all__ = ["MedicalFolderDataset", "MedicalFolderType"]  # noqa: F822 (MedicalFolderDataset: __getattr__)
