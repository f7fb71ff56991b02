"""`MedicalFolderDataset`: a medical folder as a torch Dataset of MONAI-style dictionaries.

Import it from `fedsilo.common.datasets.medical_folder` (this module imports torch; that one does not).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .demographics import Demographics, read_demographics
from .loading_plan import DataLoadingPlan
from .medical_tree import Subject, Tree, VolumeError, read_header, read_volume, scan_tree
from .registry import DatasetFormatError

log = logging.getLogger("fedsilo.datasets.medical_folder")

Transform = Callable[[Any], Any]
CACHE_MAX_BYTES = 4 << 30
"""`cache=True` keeps decoded volumes up to this many bytes: a round of 25 updates of batch 8 over 12 subjects
reads each volume about 16 times, and decoding a 64^3 .nii.gz pair costs 40-60 ms on this machine."""


class MedicalFolderDataset(Dataset):
    """Subjects of a medical folder (`medical_tree.py`), each item `(data, target)`:

    `data` = {modality: float32 tensor C x D x H x W (a MONAI `MetaTensor` carrying the affine and spacing),
    ..., "demographics": {column: value}} and `target` = {target modality: tensor}, or the demographics
    when no target modality is asked (a classification on a demographics column). `transform` gets the
    whole dictionary (images of both sides and "demographics"), so a MONAI `Compose` of dictionary
    transforms moves an image and its mask together; `target_transform` then gets the target dictionary,
    `demographics_transform` the demographics row. The arguments follow Fed-BioMed's class of this name.

        dataset = MedicalFolderDataset(self.dataset_path, data_modalities=["T1w"], target_modalities=["label"],
                                       transform=Compose([ScaleIntensityd(keys=["T1w"]),
                                                          RandFlipd(keys=["T1w", "label"], prob=0.5)]))
        data, target = dataset[0]        # data["T1w"]: 1 x 32 x 32 x 32, target["label"]: 1 x 32 x 32 x 32

    On a node, the worker gives the dataset the registered demographics table (`set_dataset_parameters`)
    and the node's data loading plan (`set_dlp`: a plan asking for `T1w` reads the node's `T1`). Subjects
    without a requested modality or demographics row are left out (the node's log names them;
    `report` holds the ids, `len()` the count) unless the loading plan says `missing="refuse"`. Volumes are
    read when an item is asked for and not kept, unless `cache=True` (decoded volumes kept in memory, up to
    `CACHE_MAX_BYTES`, for datasets read many times a round).
    """

    def __init__(
        self,
        root: str | Path,
        data_modalities: str | Sequence[str] = "T1",
        transform: Transform | None = None,
        target_modalities: str | Sequence[str] | None = "label",
        target_transform: Transform | None = None,
        demographics_transform: Transform | None = None,
        *,
        demographics: str | Path | None = None,
        index_col: str | None = None,
        loading_plan: DataLoadingPlan | None = None,
        cache: bool = False,
    ) -> None:
        self.root = Path(root)
        self.data_modalities = _names(data_modalities)
        self.target_modalities = _names(target_modalities)
        if not self.data_modalities:
            raise DatasetFormatError("MedicalFolderDataset needs at least one data modality")
        both = set(self.data_modalities) & set(self.target_modalities)
        if both:
            raise DatasetFormatError(f"modality {', '.join(sorted(both))} asked as data and as target")
        self.transform = transform
        self.target_transform = target_transform
        self.demographics_transform = demographics_transform
        self.demographics_path = Path(demographics) if demographics else None
        self.index_col = index_col
        self.dlp = loading_plan or DataLoadingPlan()
        self.report: dict[str, Any] = {}
        self._tree: Tree | None = None
        self._subjects: list[Subject] | None = None
        self._table: Demographics | None = None
        self.cache = cache
        self._cache: dict[Path, tuple[Any, Any, tuple[float, ...]]] = {}
        self._cached_bytes = 0

    @classmethod
    def from_record(cls, record: Mapping[str, Any], loading_plan: DataLoadingPlan | None = None,
                    **kwargs: Any) -> MedicalFolderDataset:  # fmt: skip
        """The dataset of a node's record (`path` and the registered options), with `loading_plan`."""
        options = dict(record.get("options") or {})
        kwargs.setdefault("demographics", options.get("demographics"))
        kwargs.setdefault("index_col", options.get("index_col"))
        return cls(record["path"], loading_plan=loading_plan, **kwargs)

    # ------------------------------------------------------------------ set by the node (Fed-BioMed names)
    def set_dataset_parameters(self, parameters: Mapping[str, Any]) -> None:
        """The registered demographics table and its index column, unless the plan named its own."""
        if self.demographics_path is None and parameters.get("demographics"):
            self.demographics_path = Path(parameters["demographics"])
            self.index_col = parameters.get("index_col")
        self._subjects = None

    def set_dlp(self, dlp: DataLoadingPlan) -> None:
        self.dlp = dlp
        self._subjects = None

    # ------------------------------------------------------------------ the index
    @property
    def subjects(self) -> list[str]:
        return [s.name for s in self._index()]

    def _index(self) -> list[Subject]:
        if self._subjects is None:
            self._subjects = self._build()
        return self._subjects

    def _build(self) -> list[Subject]:
        try:
            tree = scan_tree(self.root)
        except VolumeError as exc:
            raise DatasetFormatError(str(exc)) from None
        self._tree = tree
        served = {self.dlp.served_modality(m) for m in tree.modalities}
        unknown = [m for m in (*self.data_modalities, *self.target_modalities) if m not in served]
        if unknown:
            raise DatasetFormatError(f"modality {', '.join(unknown)} is not on this node; it has: "
                                     f"{', '.join(sorted(served)) or 'none'}")  # fmt: skip
        self._table = self._read_table()
        policy = self.dlp.missing or "drop"
        left_out: dict[str, list[str]] = {}
        usable = []
        for subject in tree.subjects.values():
            reasons = [self._problem(subject, m) for m in (*self.data_modalities, *self.target_modalities)]
            reasons = [r for r in reasons if r]
            if self._table is not None and subject.name not in self._table.rows and policy != "keep":
                reasons.append("no demographics row")
            if reasons:
                left_out[subject.name] = reasons
            else:
                usable.append(subject)
        self.report = {"subjects": len(tree.subjects), "used": len(usable), "left_out": left_out}
        if left_out:
            if policy == "refuse":
                raise DatasetFormatError(f"{len(left_out)} of {len(tree.subjects)} subjects lack a requested "
                                         "modality or demographics row; this node's loading plan refuses them")
            log.warning("medical folder %s: %d of %d subjects left out: %s", self.root, len(left_out),
                        len(tree.subjects), "; ".join(f"{k}: {', '.join(v)}" for k, v in left_out.items()))  # fmt: skip
        if not usable:
            raise DatasetFormatError(f"none of the {len(tree.subjects)} subjects has every requested modality "
                                     f"({', '.join((*self.data_modalities, *self.target_modalities))})")  # fmt: skip
        return usable

    def _problem(self, subject: Subject, modality: str) -> str:
        """Why `subject` cannot serve `modality` ("" when it can): no folder, or a volume whose header fails
        (headers only, about 1 ms each: a file that is no NIfTI, or a huge declared shape, leaves the subject
        out here rather than failing a batch)."""
        local = self.dlp.local_modality(modality)
        if local in subject.problems:
            return f"no {modality} ({subject.problems[local]})"
        if local not in subject.sources:
            return f"no {modality}"
        try:
            read_header(subject.sources[local])
        except VolumeError as exc:
            subject.problems[local] = str(exc)
            return f"no {modality} ({exc})"
        return ""

    def _read_table(self) -> Demographics | None:
        if self.demographics_path is None:
            return None
        if not self.index_col:
            raise DatasetFormatError("a demographics table needs its index column (index_col)")
        return read_demographics(self.demographics_path, self.index_col)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._index())

    def __getitem__(self, i: int) -> tuple[dict[str, Any], Any]:
        sample = self.sample(i)
        sample.pop("subject")
        data = {m: sample.pop(m) for m in self.data_modalities}
        target: Any = {m: sample.pop(m) for m in self.target_modalities}
        if "demographics" in sample:
            data["demographics"] = sample["demographics"]
            if not self.target_modalities:
                target = sample["demographics"]
        if self.target_transform is not None:
            target = self.target_transform(target)
        return data, target

    def sample(self, i: int) -> dict[str, Any]:
        """Item `i` as one dictionary {modality: tensor, ..., "demographics": {...}, "subject": folder name},
        after `transform` (the form MONAI's dictionary transforms and `LoadImaged` use)."""
        subject = self._index()[i]
        out: dict[str, Any] = {}
        for m in (*self.data_modalities, *self.target_modalities):
            out[m] = self._volume(i, subject, m, is_target=m in self.target_modalities)
        row = self._demographics(subject.name)
        if row is not None:
            out["demographics"] = self.demographics_transform(row) if self.demographics_transform else row
        if self.transform is not None:
            out = self.transform(out)
        out["subject"] = subject.name
        return out

    def _volume(self, i: int, subject: Subject, modality: str, is_target: bool) -> Any:
        source = subject.sources[self.dlp.local_modality(modality)]
        hit = self._cache.get(source.path)
        if hit is not None:
            array, affine, spacing = hit[0].copy(), hit[1], hit[2]  # a transform may write into what it gets
        else:
            try:
                array, affine, spacing = read_volume(source)
            except VolumeError as exc:
                # the researcher may see this message (a failed batch): the subject's position, not its id or path
                log.warning("medical folder %s: %s: %s", self.root, source.path, exc)
                raise DatasetFormatError(f"subject #{i}, modality {modality}: {exc}") from None
            if self.cache and self._cached_bytes + array.nbytes <= CACHE_MAX_BYTES:
                self._cache[source.path] = (array.copy(), affine, spacing)
                self._cached_bytes += array.nbytes
        if is_target and self.dlp.label_map:
            array = self.dlp.map_labels(array)
        return _meta_tensor(array, affine, spacing)

    def _demographics(self, subject: str) -> dict[str, float | str] | None:
        if self._table is None:
            return None
        row = self._table.rows.get(subject)
        if row is None:  # kept by missing="keep"
            row = {c: (math.nan if kind == "numeric" else "") for c, kind in self._table.columns.items()}
        return {self.dlp.served_column(c): v for c, v in row.items()}


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    return [str(n) for n in names]


def _meta_tensor(array: Any, affine: Any, spacing: tuple[float, ...]) -> torch.Tensor:
    """A MONAI MetaTensor (affine and spacing travel with the voxels, as after LoadImaged), else a tensor."""
    tensor = torch.from_numpy(array)
    try:
        from monai.data import MetaTensor
    except ImportError:  # monai is a node dependency; a plain tensor still trains
        return tensor
    meta = {"pixdim": [1.0, *spacing], "spatial_shape": list(array.shape[1:])}
    return MetaTensor(tensor, affine=torch.from_numpy(affine), meta=meta)
