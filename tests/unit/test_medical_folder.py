"""The medical-folder dataset type and `MedicalFolderDataset` on small NIfTI (and DICOM) trees written here.

Hostile inputs are files a node could be handed: a text file named .nii, links out of the tree, a header
declaring a huge volume, a truncated file, a DICOM folder mixing two series."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedsilo.common.datasets import DatasetFormatError, get
from fedsilo.common.datasets.medical_folder import MedicalFolderDataset
from fedsilo.common.datasets.medical_tree import MAX_VOXELS
from fedsilo.common.training_plan import batch_len

SHAPE = (6, 5, 4)


def volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.header.set_zooms((*spacing, 1.0)[: array.ndim])
    nib.save(img, path)
    return path


def subject(root: Path, name: str, modalities=("T1", "label"), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random(SHAPE) > 0.5).astype(np.uint8)
    for m in modalities:
        array = mask if m == "label" else (mask * 100 + 10 + rng.random(SHAPE)).astype(np.float32)
        volume(root / name / m / f"{name}_{m}.nii.gz", array)


def demographics(root: Path, rows: list[str], header: str = "participant_id;age;sex") -> Path:
    path = root / "participants.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Four subjects: sub-1 and sub-2 complete, sub-3 without a mask, sub-4 without a demographics row."""
    root = tmp_path / "prostate"
    for i in (1, 2, 4):
        subject(root, f"sub-{i}", seed=i)
    subject(root, "sub-3", modalities=("T1",), seed=3)
    demographics(root, ["sub-1;61;M", "sub-2;70;F", "sub-3;55;M"])
    return root


def options(root: Path, **extra) -> dict:
    return {"demographics": str(root / "participants.csv"), "index_col": "participant_id", **extra}


def register(root: Path, **extra) -> dict:
    """What the node stores for a dataset (the registry's validation, as `DatasetStore.add` runs it)."""
    v = get("medical-folder").validate(root, options(root, **extra))
    return {"path": str(root), "shape": v.shape, "summary": v.summary, "options": v.options, "warnings": v.warnings}


# ------------------------------------------------------------------------------------------ registration
def test_registration_counts_modalities_shapes_spacings_and_names_incomplete_subjects_on_the_node(tree):
    record = register(tree, label_modality="label")
    s = record["summary"]
    assert record["shape"] == [4] and s["subjects"] == 4 and s["complete"] == 3
    assert s["modalities"]["T1"] == {"subjects": 4, "shapes": {"1x6x5x4": 4}, "spacings": {"1x1x2": 4},
                                     "dtypes": {"float32": 4}}  # fmt: skip
    assert s["modalities"]["label"]["subjects"] == 3 and s["modalities"]["label"]["dtypes"] == {"uint8": 3}
    assert s["incomplete"] == {"sub-3": ["label"]}
    assert s["demographics"]["subjects_without_row"] == ["sub-4"]
    assert s["demographics"]["columns"] == {"age": "numeric", "sex": "categorical"}
    assert any("1 of 4 subjects lack a modality (label: 1)" in w for w in record["warnings"])


def test_description_for_researchers_holds_counts_never_subject_ids_or_values(tree):
    record = register(tree, label_modality="label")
    described = get("medical-folder").describe(record, min_count=3)
    text = json.dumps(described)
    for secret in ("sub-", "participants.csv", str(tree), "61", "70"):
        assert secret not in text
    assert described["subjects"] == 4 and described["incomplete"] == "< 3"
    assert described["demographics"]["subjects_without_row"] == "< 3"
    assert described["modalities"]["label"]["shapes"]["categories"] == {"1x6x5x4": 3}
    assert get("medical-folder").describe(record, min_count=5)["modalities"]["T1"]["shapes"]["categories"] == {}


def test_registration_refuses_a_folder_without_subjects_and_inconsistent_options(tmp_path, tree):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="no subject folder"):
        get("medical-folder").validate(tmp_path / "empty", {})
    with pytest.raises(DatasetFormatError, match="index-col"):
        get("medical-folder").validate(tree, {"demographics": str(tree / "participants.csv")})
    with pytest.raises(DatasetFormatError, match="label modality 'mask'"):
        get("medical-folder").validate(tree, {"label_modality": "mask"})
    with pytest.raises(DatasetFormatError, match="index column 'ID'"):
        get("medical-folder").validate(tree, options(tree, index_col="ID"))


# ------------------------------------------------------------------------------------------ loading
def test_subjects_missing_a_modality_or_demographics_row_are_left_out_and_reported(tree, caplog):
    ds = MedicalFolderDataset(tree, "T1", target_modalities="label", demographics=tree / "participants.csv",
                              index_col="participant_id")  # fmt: skip
    assert len(ds) == 2 and ds.subjects == ["sub-1", "sub-2"]
    assert ds.report["left_out"] == {"sub-3": ["no label"], "sub-4": ["no demographics row"]}
    assert "2 of 4 subjects left out" in caplog.text and "sub-3" in caplog.text  # the node's log names them
    only_t1 = MedicalFolderDataset(tree, "T1", target_modalities=None)
    assert len(only_t1) == 4  # no mask asked: sub-3 serves


def test_items_are_monai_style_dictionaries_with_affine_and_demographics(tree):
    ds = MedicalFolderDataset(tree, ["T1"], target_modalities=["label"], demographics=tree / "participants.csv",
                              index_col="participant_id")  # fmt: skip
    data, target = ds[0]
    assert set(data) == {"T1", "demographics"} and set(target) == {"label"}
    assert data["T1"].shape == (1, *SHAPE) and data["T1"].dtype == torch.float32
    assert data["demographics"] == {"age": 61.0, "sex": "M"}
    assert torch.equal(torch.as_tensor(data["T1"].affine), torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])).double())
    assert torch.equal((data["T1"] > 50).float(), target["label"].as_tensor())
    assert ds.sample(1)["subject"] == "sub-2"


def test_monai_dictionary_transforms_move_image_and_mask_together_and_batches_count_samples(tree):
    from monai.transforms import Compose, RandFlipd, Resized, ScaleIntensityd

    scale, resize = ScaleIntensityd(keys=["T1"]), Resized(keys=["T1", "label"], spatial_size=(8, 8, 8), mode="nearest")
    transform = Compose([scale, resize, RandFlipd(keys=["T1", "label"], prob=1.0, spatial_axis=0)])
    ds = MedicalFolderDataset(tree, "T1", transform=transform, target_modalities="label")
    data, target = ds[0]
    assert data["T1"].shape == (1, 8, 8, 8) and target["label"].shape == (1, 8, 8, 8)
    assert float(data["T1"].min()) == 0.0 and float(data["T1"].max()) == 1.0
    unflipped = resize(scale(MedicalFolderDataset(tree, "T1", target_modalities="label").sample(0)))
    assert torch.equal(data["T1"].as_tensor(), torch.flip(unflipped["T1"].as_tensor(), dims=[1]))
    assert torch.equal((data["T1"] > 0.5).float().as_tensor(), target["label"].float().as_tensor())
    batch_data, batch_target = next(iter(DataLoader(ds, batch_size=3)))
    assert batch_data["T1"].shape == (3, 1, 8, 8, 8)
    assert batch_len(batch_target) == 3  # a dict's len() would count its keys


def test_without_a_target_modality_the_target_is_the_demographics_row(tree):
    ds = MedicalFolderDataset(tree, "T1", target_modalities=None, demographics=tree / "participants.csv",
                              index_col="participant_id")  # fmt: skip
    _, target = ds[2]
    assert target == {"age": 55.0, "sex": "M"}
    _, batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch_len(batch) == 2


@pytest.mark.parametrize("asked", ["T2", "../sub-1/T1", "sub-1"])
def test_a_modality_nobody_has_is_a_clear_error_naming_what_the_node_has(tree, asked):
    ds = MedicalFolderDataset(tree, asked, target_modalities="label")  # a name is a key, never a path
    with pytest.raises(DatasetFormatError, match="it has: T1, label") as err:
        len(ds)
    assert str(err.value).startswith(f"modality {asked} is not on this node")


def test_four_dimensional_volumes_are_channel_first(tmp_path):
    volume(tmp_path / "s1" / "DWI" / "dwi.nii", np.arange(6 * 5 * 4 * 3, dtype=np.float32).reshape(6, 5, 4, 3))
    data, _ = MedicalFolderDataset(tmp_path, "DWI", target_modalities=None)[0]
    assert data["DWI"].shape == (3, 6, 5, 4)
    assert float(data["DWI"][2, 0, 0, 1]) == 5.0  # voxel (0, 0, 1), channel 2 of the file's (x, y, z, c)


# ------------------------------------------------------------------------------------------ hostile files
def test_a_text_file_named_nii_is_reported_not_read_and_its_subject_left_out(tree):
    bogus = tree / "sub-2" / "T1" / "sub-2_T1.nii.gz"
    bogus.unlink()
    (bogus.parent / "notes.nii").write_text("this is not an image\n" * 30)
    record = register(tree)
    assert "not a readable NIfTI" in record["summary"]["unreadable"]["sub-2"]["T1"]
    assert "sub-2" in record["summary"]["incomplete"]
    ds = MedicalFolderDataset(tree, "T1", target_modalities="label")
    assert ds.subjects == ["sub-1", "sub-4"]
    assert "not a readable NIfTI" in ds.report["left_out"]["sub-2"][0]


def test_links_out_of_the_tree_are_never_followed(tree, tmp_path):
    outside = tmp_path / "elsewhere"
    volume(outside / "secret.nii.gz", np.ones(SHAPE, dtype=np.float32))
    target = tree / "sub-1" / "T1" / "sub-1_T1.nii.gz"
    target.unlink()
    target.symlink_to(outside / "secret.nii.gz")  # a file linked out
    (tree / "sub-9").symlink_to(outside, target_is_directory=True)  # a subject linked out
    (tree / "sub-2" / "label").rename(tree / "label-2")
    (tree / "sub-2" / "label").symlink_to(tree / "label-2", target_is_directory=True)  # a link inside is fine
    record = register(tree)
    assert "sub-9" not in record["summary"]["incomplete"] and record["summary"]["subjects"] == 4
    assert record["summary"]["unreadable"]["sub-1"] == {"T1": "links outside the dataset folder"}
    ds = MedicalFolderDataset(tree, "T1", target_modalities="label")
    assert ds.subjects == ["sub-2", "sub-4"]


def test_a_header_declaring_a_huge_volume_is_refused_before_any_voxel_is_read(tree):
    header = nib.Nifti1Header()
    header.set_data_shape((30_000, 30_000, 30_000))  # NIfTI-1 dims are int16
    header.set_data_dtype(np.float32)
    path = tree / "sub-1" / "T1" / "sub-1_T1.nii"
    (tree / "sub-1" / "T1" / "sub-1_T1.nii.gz").unlink()
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    record = register(tree)
    assert f"over the node's limit of {MAX_VOXELS}" in record["summary"]["unreadable"]["sub-1"]["T1"]
    ds = MedicalFolderDataset(tree, "T1", target_modalities=None)
    assert "sub-1" not in ds.subjects and len(ds) == 3


def test_a_truncated_volume_is_reported(tree):
    path = tree / "sub-1" / "T1" / "sub-1_T1.nii"
    (tree / "sub-1" / "T1" / "sub-1_T1.nii.gz").unlink()
    volume(path, np.ones(SHAPE, dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-40])
    assert "truncated" in register(tree)["summary"]["unreadable"]["sub-1"]["T1"]


def test_two_volumes_in_one_modality_folder_are_ambiguous_not_guessed(tree):
    volume(tree / "sub-1" / "T1" / "second.nii.gz", np.ones(SHAPE, dtype=np.float32))
    record = register(tree)
    assert record["summary"]["unreadable"]["sub-1"]["T1"] == "2 NIfTI files; a modality folder holds one volume"


def test_duplicated_demographics_rows_are_not_used(tree):
    demographics(tree, ["sub-1;61;M", "sub-1;62;M", "sub-2;70;F", "sub-3;55;M", "sub-4;40;F"])
    record = register(tree)
    assert record["summary"]["demographics"]["duplicates"] == ["sub-1"]
    assert record["summary"]["demographics"]["subjects_without_row"] == ["sub-1"]
    assert any("more than one demographics row" in w for w in record["warnings"])


# ------------------------------------------------------------------------------------------ DICOM
def dicom_series(folder: Path, vol: np.ndarray, spacing=(0.5, 0.7, 2.0), series_uid: str | None = None) -> None:
    """`vol` (x, y, z) as one CT slice file per z, named in reverse order (ordering must use positions)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, generate_uid(), series_uid
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (between rows = along y), then column spacing
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, k * spacing[2]]
        ds.InstanceNumber = vol.shape[2] - k
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"slice{vol.shape[2] - k:03d}.dcm", enforce_file_format=True)


def test_a_dicom_series_is_read_as_a_volume_in_nifti_order(tmp_path):
    vol = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    dicom_series(tmp_path / "s1" / "CT", vol)
    record = register_plain(tmp_path)
    assert record["summary"]["modalities"]["CT"] == {"subjects": 1, "shapes": {"1x6x5x4": 1},
                                                     "spacings": {"0.5x0.7x2": 1}, "dtypes": {"int16": 1}}  # fmt: skip
    data, _ = MedicalFolderDataset(tmp_path, "CT", target_modalities=None)[0]
    assert data["CT"].shape == (1, 6, 5, 4)
    assert torch.equal(data["CT"][0].as_tensor(), torch.from_numpy(vol.astype(np.float32) - 1000))
    affine = torch.as_tensor(data["CT"].affine)
    assert affine.diagonal().tolist() == [-0.5, -0.7, 2.0, 1.0]  # DICOM's LPS as NIfTI's RAS


def test_a_dicom_folder_mixing_two_series_or_holding_junk_is_reported(tmp_path):
    vol = np.zeros((4, 4, 2), dtype=np.int16)
    dicom_series(tmp_path / "s1" / "CT", vol)
    dicom_series(tmp_path / "s1" / "CT", vol[:, :, :1] + 1)  # another series' slice, same folder
    (tmp_path / "s2" / "CT").mkdir(parents=True)
    (tmp_path / "s2" / "CT" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk" * 10)
    (tmp_path / "s4" / "CT").mkdir(parents=True)
    (tmp_path / "s4" / "CT" / "y.dcm").write_text("a text file named .dcm")
    dicom_series(tmp_path / "s3" / "CT", vol)
    unreadable = register_plain(tmp_path)["summary"]["unreadable"]
    assert unreadable["s1"]["CT"] == "2 DICOM series; a modality folder holds one"
    assert unreadable["s2"]["CT"] == "a DICOM slice has no Rows"
    assert unreadable["s4"]["CT"] == "a file is not readable DICOM (InvalidDicomError)"
    assert MedicalFolderDataset(tmp_path, "CT", target_modalities=None).subjects == ["s3"]


def register_plain(root: Path) -> dict:
    v = get("medical-folder").validate(root, {})
    return {"path": str(root), "shape": v.shape, "summary": v.summary, "options": v.options}


def test_a_fifo_named_nii_is_not_opened(tree):
    import os

    (tree / "sub-1" / "T1" / "sub-1_T1.nii.gz").unlink()
    os.mkfifo(tree / "fifo")
    (tree / "sub-1" / "T1" / "sub-1_T1.nii").symlink_to(tree / "fifo")  # inside the tree: only its kind refuses it
    (tree / "sub-5" / "T1").mkdir(parents=True)
    os.mkfifo(tree / "sub-5" / "T1" / "slice.dcm")  # a DICOM series of one FIFO
    unreadable = register(tree)["summary"]["unreadable"]
    assert unreadable["sub-1"] == {"T1": "not a regular file"}
    assert unreadable["sub-5"] == {"T1": "no NIfTI file or DICOM series"}
    assert MedicalFolderDataset(tree, "T1", target_modalities=None).subjects == ["sub-2", "sub-3", "sub-4"]


def test_cache_keeps_decoded_volumes_and_hands_out_copies(tree):
    ds = MedicalFolderDataset(tree, "T1", target_modalities="label", cache=True)
    first, _ = ds[0]
    (tree / "sub-1" / "T1" / "sub-1_T1.nii.gz").write_bytes(b"gone")  # read once: the cache answers now
    first["T1"].zero_()  # a transform writing into its input does not reach the cache
    again, _ = ds[0]
    assert float(again["T1"].max()) > 100
    assert "sub-1" not in MedicalFolderDataset(tree, "T1", target_modalities="label").subjects  # it is gone


def test_a_volume_that_fails_after_its_header_names_no_subject_or_path(tree, caplog):
    big = tree / "sub-1" / "T1" / "sub-1_T1.nii.gz"
    volume(big, np.random.default_rng(0).random((40, 40, 40)).astype(np.float32))
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # the header survives, the voxels do not
    ds = MedicalFolderDataset(tree, "T1", target_modalities=None)
    assert ds.subjects[0] == "sub-1"
    with pytest.raises(DatasetFormatError) as err:
        ds[0]
    assert str(err.value).startswith("subject #0, modality T1: cannot decode the volume")
    assert "sub-1" not in str(err.value) and str(tree) not in str(err.value)  # it may reach a researcher
    assert str(big) in caplog.text  # the node's log says which file


def test_a_description_stays_small_whatever_the_folder_names(tree):
    """DICOM exports may name a series folder per subject: 5,000 modalities and 1,000 columns would make a 1.1 MB
    search reply (a message is at most 256 KiB); the description names the most common ones and counts the rest."""
    modalities = {f"series_{i:05d}": {"subjects": 1, "shapes": {f"1x{i}x512x512": 1}, "spacings": {"1x1x1": 1},
                                      "dtypes": {"int16": 1}} for i in range(5000)}  # fmt: skip
    modalities["T1"] = {"subjects": 5000, "shapes": {f"1x{i}x512x512": 1 for i in range(5000)},
                        "spacings": {"1x1x1": 5000}, "dtypes": {"int16": 5000}}  # fmt: skip
    summary = {"subjects": 5000, "complete": 0, "modalities": modalities, "incomplete": {}, "unreadable": {},
               "demographics": {"columns": {f"c{i}": "numeric" for i in range(1000)}, "subjects_without_row": [],
                                "duplicates": []}}  # fmt: skip
    described = get("medical-folder").describe({"shape": [5000], "summary": summary}, min_count=5)
    assert len(json.dumps(described)) < 16_000
    assert next(iter(described["modalities"])) == "T1" and described["modalities_not_described"] == 4981
    assert described["modalities"]["T1"]["shapes"] == {"distinct": 5000, "categories": {}, "other": 5000}
    assert described["demographics"]["columns_not_described"] == 900
