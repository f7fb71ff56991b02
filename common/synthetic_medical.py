"""Synthetic biomedical data for the tutorials, the benchmarks and the tests. Never real patients.

Two kinds, both written in the layouts fedsilo's dataset types read:

- **Prostate-like MR volumes** (`make_prostate_site`): one BIDS-like medical folder per hospital, a
  T1w-like volume and a gland mask per subject plus a demographics CSV. Hospitals differ the way real
  scanners do (Fed-BioMed's prostate experiment pooled three public cohorts for this reason): intensity
  scale and contrast, a multiplicative bias field, the field of view (so the gland covers a different
  share of the volume) and the voxel spacing written in the NIfTI header.
- **MedNIST-style 2D images** (`make_mednist`): a class-per-folder tree of PNGs with a handful of
  synthetic "modalities" (shapes a small CNN tells apart, with noise and jitter).

    sites = make_prostate_sites("data/prostate", subjects=12, shape=(32, 32, 32))
    make_mednist("data/mednist", per_class=200, seed=1)

Everything is drawn from `numpy.random.default_rng(seed)`: the same call writes the same files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPE = (32, 32, 32)
"""Default volume size (D, H, W): a UNet with four stride-2 levels needs a multiple of 16."""


@dataclass(frozen=True)
class Scanner:
    """How one hospital's scanner renders the same anatomy."""

    name: str
    scale: float  # intensity of the brightest tissue
    gamma: float  # contrast curve
    bias: float  # strength of the smooth multiplicative bias field
    fov: float  # field of view relative to the reference: larger means a smaller gland in voxels
    spacing: tuple[float, float, float]  # mm, written in the NIfTI affine
    noise: float  # Rician-like noise, relative to scale
    modality: str = "T1w"
    dtype: str = "float32"


SCANNERS = (
    Scanner("site-a", scale=1000.0, gamma=1.0, bias=0.25, fov=1.0, spacing=(3.0, 0.6, 0.6), noise=0.04),
    Scanner("site-b", scale=4000.0, gamma=0.8, bias=0.4, fov=1.25, spacing=(1.5, 0.8, 0.8), noise=0.06),
    # the third hospital names its modality `T1`: the tutorial's data loading plan serves it as `T1w`
    Scanner("site-c", scale=255.0, gamma=1.3, bias=0.15, fov=0.85, spacing=(4.0, 0.5, 0.5), noise=0.03,
            modality="T1", dtype="int16"),
)  # fmt: skip


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")  # type: ignore[return-value]


def prostate_volume(
    rng: np.random.Generator, scanner: Scanner, shape: tuple[int, int, int] = SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """One subject: (image float32 or the scanner's dtype, mask uint8) of `shape`.

    The anatomy (a gland ellipsoid with a brighter peripheral rim inside a pelvis-like body) varies by
    subject; the scanner sets intensities, bias field, field of view and noise.
    """
    z, y, x = (g * scanner.fov for g in _grid(shape))
    centre = rng.normal(0.0, 0.06, 3)
    radii = rng.uniform(0.36, 0.5, 3) * np.array([0.8, 1.0, 1.1])
    r = np.sqrt(((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                + ((x - centre[2]) / radii[2]) ** 2)  # fmt: skip
    gland = r <= 1.0
    body = (y / 0.9) ** 2 + (x / 0.95) ** 2 <= 1.0
    image = np.where(body, 0.35, 0.02).astype(np.float32)
    image += 0.08 * np.sin(6 * x + rng.uniform(0, 6)) * body  # muscle and fat texture around the gland
    image = np.where(gland, 0.55 + 0.25 * np.clip(r, 0, 1) ** 4, image)  # brighter peripheral zone
    coeffs = rng.normal(0.0, scanner.bias, 4)
    field = np.exp(coeffs[0] * z + coeffs[1] * y + coeffs[2] * x + coeffs[3] * (x * y))
    image = np.clip(image * field, 0.0, None) ** scanner.gamma
    image += np.abs(rng.normal(0.0, scanner.noise, shape))
    image = (image * scanner.scale).astype(np.float32)
    if scanner.dtype != "float32":
        image = np.round(image).astype(scanner.dtype)
    return image, gland.astype(np.uint8)


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def make_prostate_site(
    root: str | Path,
    scanner: Scanner,
    subjects: int,
    shape: tuple[int, int, int] = SHAPE,
    seed: int = 0,
    missing_label: int = 0,
) -> Path:
    """Write one hospital's medical folder; `missing_label` subjects get no mask (reported on registration).

    Layout: `root/sub-NNN/<modality>/sub-NNN_<modality>.nii.gz`, `root/sub-NNN/label/sub-NNN_label.nii.gz`
    and `root/participants.csv` (participant_id, age, psa, centre).
    """
    import nibabel as nib  # a node dependency; imported here so `common` stays importable without it

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(subjects):
        sid = f"sub-{i + 1:03d}"
        image, mask = prostate_volume(rng, scanner, shape)
        for modality, array in ((scanner.modality, image), ("label", mask)):
            if modality == "label" and i >= subjects - missing_label:
                continue
            folder = root / sid / modality
            folder.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(array, _affine(scanner.spacing))
            img.header.set_zooms(scanner.spacing)
            nib.save(img, folder / f"{sid}_{modality}.nii.gz")
        rows.append([sid, int(rng.integers(48, 80)), round(float(rng.lognormal(1.8, 0.5)), 1), scanner.name])
    with open(root / "participants.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["participant_id", "age", "psa", "centre"])
        writer.writerows(rows)
    return root


def make_prostate_sites(
    root: str | Path, subjects: int, shape: tuple[int, int, int] = SHAPE, seed: int = 2024,
    scanners: tuple[Scanner, ...] = SCANNERS,
) -> list[Path]:  # fmt: skip
    """One medical folder per scanner under `root` (root/site-a, ...), each with its own seed."""
    return [make_prostate_site(Path(root) / s.name, s, subjects, shape, seed=seed + k) for k, s in enumerate(scanners)]


# ------------------------------------------------------------------------------------- 2D images
MEDNIST_CLASSES = ("AbdomenCT", "BreastMRI", "ChestCT", "Hand", "HeadCT")


def mednist_image(rng: np.random.Generator, label: int, size: int = 64) -> np.ndarray:
    """A uint8 `size`×`size` image whose structure depends on the class (with jitter and noise)."""
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    cy, cx = rng.normal(0, 0.08, 2)
    r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    s = rng.uniform(0.85, 1.15)
    if label == 0:  # abdomen: a large disc with organs
        img = (r < 0.75 * s) * 0.5 + (np.sqrt((y - cy) ** 2 + (x - cx - 0.3) ** 2) < 0.2 * s) * 0.4
    elif label == 1:  # breast: a half disc
        img = ((r < 0.8 * s) & (x > cx - 0.1)) * 0.7
    elif label == 2:  # chest: two lungs
        img = (r < 0.8 * s) * 0.6 - ((np.abs(np.abs(x - cx) - 0.35) < 0.2 * s) & (np.abs(y - cy) < 0.5)) * 0.5
    elif label == 3:  # hand: finger-like stripes
        img = ((np.sin((x - cx) * 14 * s) > 0.3) & (y - cy > -0.6) & (y - cy < 0.7)) * 0.8
    else:  # head: a ring (skull) around a disc
        img = ((r > 0.62 * s) & (r < 0.75 * s)) * 0.9 + (r < 0.6 * s) * 0.35
    img = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
    return (img * 255).astype(np.uint8)


def make_mednist(root: str | Path, per_class: int, size: int = 64, seed: int = 0,
                 classes: tuple[str, ...] = MEDNIST_CLASSES) -> Path:  # fmt: skip
    """A class-per-folder tree of PNGs (`root/<class>/<class>_NNNN.png`), what the `images` type reads."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(mednist_image(rng, label, size)).save(folder / f"{name}_{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    """`scripts/make_medical_data`: write the tutorials' data (see --help)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=["prostate", "mednist"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--subjects", type=int, default=24, help="prostate: subjects per site")
    parser.add_argument("--size", type=int, default=32, help="prostate: cube side; mednist: image side")
    parser.add_argument("--per-class", type=int, default=300, help="mednist: images per class")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    if args.kind == "prostate":
        for path in make_prostate_sites(args.out, args.subjects, (args.size,) * 3, seed=args.seed):
            print(path)
    else:
        print(make_mednist(args.out, args.per_class, args.size, seed=args.seed))


if __name__ == "__main__":
    main()
