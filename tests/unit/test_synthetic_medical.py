"""The tutorials' synthetic medical data: deterministic, hospital-specific, in the layouts the dataset types read."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from fedsilo.common.synthetic_medical import (
    MEDNIST_CLASSES,
    SCANNERS,
    make_mednist,
    make_prostate_site,
    make_prostate_sites,
)


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_same_seed_same_volumes_other_seed_other_volumes(tmp_path: Path) -> None:
    a = _arrays(make_prostate_site(tmp_path / "a", SCANNERS[0], subjects=2, shape=(16, 16, 16), seed=3))
    b = _arrays(make_prostate_site(tmp_path / "b", SCANNERS[0], subjects=2, shape=(16, 16, 16), seed=3))
    c = _arrays(make_prostate_site(tmp_path / "c", SCANNERS[0], subjects=2, shape=(16, 16, 16), seed=4))
    assert a.keys() == b.keys() == c.keys() and len(a) == 4
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_sites_differ_like_scanners_do(tmp_path: Path) -> None:
    roots = make_prostate_sites(tmp_path, subjects=3, shape=(16, 16, 16))
    seen = []
    for root, scanner in zip(roots, SCANNERS, strict=True):
        image = nib.load(next(root.glob(f"sub-001/{scanner.modality}/*.nii.gz")))
        mask = np.asarray(nib.load(next(root.glob("sub-001/label/*.nii.gz"))).dataobj)
        data = np.asarray(image.dataobj)
        assert image.header.get_zooms() == scanner.spacing
        assert data.dtype == np.dtype(scanner.dtype) and data.shape == (16, 16, 16)
        assert set(np.unique(mask)) == {0, 1} and 0.005 < mask.mean() < 0.2
        assert data[mask == 1].mean() > data[mask == 0].mean()  # the gland is visible
        seen.append(float(np.percentile(data, 99)))
        assert (root / "participants.csv").read_text().splitlines()[0] == "participant_id,age,psa,centre"
    assert max(seen) / min(seen) > 5  # intensity scales differ between hospitals
    assert [s.modality for s in SCANNERS].count("T1") == 1  # the data loading plan's case


def test_missing_labels_are_left_out(tmp_path: Path) -> None:
    root = make_prostate_site(tmp_path, SCANNERS[1], subjects=3, shape=(16, 16, 16), missing_label=1)
    assert sorted(p.name for p in root.glob("*/label")) == ["label", "label"]
    assert not (root / "sub-003" / "label").exists() and (root / "sub-003" / "T1w").is_dir()


def test_mednist_tree(tmp_path: Path) -> None:
    root = make_mednist(tmp_path, per_class=3, size=24, seed=1)
    assert sorted(p.name for p in root.iterdir()) == sorted(MEDNIST_CLASSES)
    images = [np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))]
    assert len(images) == 3 * len(MEDNIST_CLASSES) and all(i.shape == (24, 24) for i in images)
    means = [np.mean([np.asarray(Image.open(p)).mean() for p in (root / c).glob("*.png")]) for c in MEDNIST_CLASSES]
    assert len({round(m) for m in means}) == len(MEDNIST_CLASSES)  # classes look different
