"""Site data intake: MedMNIST-style .npz files or one-folder-per-class image trees, loaded into one
in-memory format (float32 (N, C, H, W) in [0, 1], int64 labels) with errors that name the bad file.
A hospital's DICOM / NIfTI files and manifest CSVs go through ``client/intake.py`` into the same format."""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_BILINEAR = Image.Resampling.BILINEAR  # Pillow's resize antialiases when it shrinks


class DataError(ValueError):
    """Unusable input data; the message names the path and what was expected."""


@dataclass
class ImageDataset:
    images: np.ndarray  # float32 (N, C, H, W) in [0, 1], C = 1 or 3
    labels: np.ndarray  # int64 (N,) in 0..len(classes)-1
    classes: list[str]
    source: str
    patient_ids: np.ndarray | None = None  # (N,) one id per image when the unit of privacy is a patient
    skipped: tuple[tuple[str, str], ...] = ()  # (file, reason) of files the intake could not read (client/intake.py)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise DataError(f"{self.source}: images must be (N, C, H, W) with C in (1, 3), got {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise DataError(
                f"{self.source}: labels must be shaped ({len(self.images)},), got {self.labels.shape}"
            )
        if self.patient_ids is not None and self.patient_ids.shape != (len(self.images),):
            raise DataError(f"{self.source}: patient ids must be shaped ({len(self.images)},), "
                            f"got {self.patient_ids.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageDataset:
        idx = np.asarray(idx)
        patients = None if self.patient_ids is None else self.patient_ids[idx]
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes), self.source, patients)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


def load_dataset(path: str | Path, split: str = "train", resolution: int | None = 28,
                 num_classes: int | None = None, slice_axis: int | str = "axial") -> ImageDataset:
    """``path``: a .npz, a manifest .csv, or a folder (manifest.csv inside, or one subfolder per class of
    PNG/JPEG, DICOM or NIfTI files). ``slice_axis``: how NIfTI volumes are sliced (``client/nifti.py``)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() == ".csv":
        # imported here: an .npz site (every simulation) never pays for importing pydicom and nibabel
        from . import intake
        if p.is_dir() and not intake.is_medical_folder(p):
            return load_image_folder(p, resolution)
        _check_resolution(resolution, p, allow_none=False)
        load = intake.load_medical_folder if p.is_dir() else intake.load_manifest
        return load(p, split, resolution, num_classes, slice_axis)
    if p.suffix.lower() == ".npz":
        return load_npz(p, split, resolution, num_classes)
    what = "unsupported file" if p.exists() else "path does not exist"
    raise DataError(f"{p}: {what}; expected a .npz file, a manifest .csv, or a folder with one subfolder of "
                    "PNG/JPEG, DICOM or NIfTI images per class")


def load_npz(path: str | Path, split: str = "train", resolution: int | None = 28,
             num_classes: int | None = None) -> ImageDataset:
    """``num_classes`` given (a site's part of a known label set): labels must lie below it and a class may
    be absent — a hospital can lack a class; without it, every label up to the max must occur."""
    p = Path(path)
    _check_resolution(resolution, p, allow_none=True)
    if not p.is_file():
        raise DataError(f"{p}: file does not exist; expected a MedMNIST-style .npz file")
    keys = (f"{split}_images", f"{split}_labels")
    try:
        # allow_pickle=False: a data file must never be able to run code on the site's machine
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: cannot read as an npz archive ({e}); expected a .npz with keys {list(keys)}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy renamed to .npz
        raise DataError(f"{p}: not an npz archive (a single array); expected a .npz with keys {list(keys)}")
    with z:
        found = sorted(z.files)
        missing = [k for k in keys if k not in found]
        if missing:
            raise DataError(f"{p}: missing key(s) {missing}; expected {list(keys)}, found keys {found}")
        try:
            raw_images, raw_labels = z[keys[0]], z[keys[1]]
            raw_patients = z[f"{split}_patient_ids"] if f"{split}_patient_ids" in found else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{p}: cannot read {list(keys)} ({e}); expected plain numeric arrays") from None

    images = _npz_images(raw_images, f"{p} [{keys[0]}]")
    labels = _npz_labels(raw_labels, f"{p} [{keys[1]}]")
    if len(images) != len(labels):
        raise DataError(
            f"{p}: {keys[0]} has {len(images)} images but {keys[1]} has {len(labels)} labels; expected equal counts"
        )
    if num_classes is not None:
        if labels.max() >= num_classes:
            raise DataError(f"{p}: label {int(labels.max())} in {keys[1]}; expected class ids below {num_classes}")
        counts = np.bincount(labels, minlength=num_classes)
    else:
        counts = np.bincount(labels)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty and num_classes is None:
        raise DataError(
            f"{p}: empty class(es) {empty} in {keys[1]}: labels span 0..{len(counts) - 1} but these have no images; "
            "expected every label between 0 and the max label to occur"
        )
    if resolution is not None and images.shape[2:] != (resolution, resolution):
        images = _resize(images, resolution)
    patients = None if raw_patients is None else _npz_patients(raw_patients, len(labels), f"{p} [{split}_patient_ids]")
    return ImageDataset(images, labels, [str(i) for i in range(len(counts))], str(p), patients)


def _npz_patients(a: np.ndarray, n: int, where: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.shape != (n,) or a.dtype.kind not in "iuU":
        raise DataError(f"{where}: patient ids shaped {a.shape} of dtype {a.dtype}; expected ({n},) integer or "
                        "string ids, one per image")
    return a


def _npz_images(a: np.ndarray, where: str) -> np.ndarray:
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[3] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: images shaped {a.shape}; expected (N, H, W) grayscale or (N, H, W, 3) RGB")
    if 0 in a.shape:
        raise DataError(f"{where}: no image data (shape {a.shape}); expected at least one non-empty image")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind == "f":
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise DataError(f"{where}: float images range {lo}..{hi}; expected values in [0, 1] (or uint8 0..255)")
        return np.ascontiguousarray(a, dtype=np.float32)
    raise DataError(f"{where}: images dtype {a.dtype}; expected uint8 (0..255) or float in [0, 1]")


def _npz_labels(a: np.ndarray, where: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim != 1:
        raise DataError(f"{where}: labels shaped {a.shape}; expected (N,) or (N, 1) single-label class ids")
    if len(a) == 0:
        raise DataError(f"{where}: no labels; expected at least one")
    # float labels are fine if they are whole numbers (e.g. exported through pandas)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise DataError(f"{where}: labels dtype {a.dtype} (e.g. {a[:3].tolist()}); expected integer class ids")
    if a.min() < 0:
        raise DataError(f"{where}: negative label {int(a.min())}; expected class ids >= 0")
    return a.astype(np.int64)


def load_image_folder(path: str | Path, resolution: int | None = 28) -> ImageDataset:
    p = Path(path)
    _check_resolution(resolution, p, allow_none=False)
    if not p.is_dir():
        raise DataError(f"{p}: folder does not exist; expected a folder with one subfolder of images per class")
    # hidden entries (.ipynb_checkpoints, macOS ._x.png resource forks) are never data
    class_dirs = sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"{p}: no class subfolders; expected {p}/<class name>/<image>.png|.jpg|.jpeg")
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        files = sorted(
            f for f in d.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{d}: empty class '{d.name}': no {'/'.join(IMAGE_SUFFIXES)} images; expected at least one")
        for f in files:
            images.append(_read_gray(f, resolution))
            labels.append(label)
    return ImageDataset(
        np.stack(images)[:, None], np.asarray(labels, np.int64), [d.name for d in class_dirs], str(p)
    )


def _read_gray(f: Path, resolution: int) -> np.ndarray:
    try:
        with Image.open(f) as im:
            if im.mode.startswith("I"):
                # 16-bit PNGs (common for X-ray): convert("L") would clip everything above 255 to white
                plane = np.asarray(im, dtype=np.float32) / 65535.0
                if plane.min() < 0 or plane.max() > 1:
                    raise ValueError(f"pixel values outside 0..65535 in mode {im.mode}")
            else:
                plane = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as e:  # any decoder failure is a bad file at the site; name it
        msg = f"{f}: unreadable or corrupt image ({type(e).__name__}: {e}); expected a valid PNG/JPEG"
        raise DataError(msg) from None
    return _resize_plane(plane, resolution)


def _resize_plane(plane: np.ndarray, resolution: int) -> np.ndarray:
    if plane.shape == (resolution, resolution):
        return plane
    out = Image.fromarray(plane.astype(np.float32)).resize((resolution, resolution), _BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    n, c = images.shape[:2]
    out = np.empty((n, c, resolution, resolution), np.float32)
    for i in range(n):
        for ch in range(c):
            out[i, ch] = _resize_plane(images[i, ch], resolution)
    return out


def _check_resolution(resolution: int | None, p: Path, allow_none: bool) -> None:
    if resolution is None:
        if not allow_none:
            raise DataError(
                f"{p}: resolution=None is not allowed for an image folder (images may differ in size); expected an int"
            )
        return
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"{p}: resolution {resolution!r}; expected a positive int or None")


def save_npz(path: str | Path, train: ImageDataset, holdout: ImageDataset | None = None) -> None:
    p = Path(path)
    arrays = _to_medmnist(train, "train")
    if holdout is not None:
        arrays |= _to_medmnist(holdout, "val")
    p.parent.mkdir(parents=True, exist_ok=True)
    # temp file in the same folder so os.replace is atomic: readers never see a half-written npz
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_medmnist(ds: ImageDataset, split: str) -> dict[str, np.ndarray]:
    images = np.clip(np.rint(ds.images * 255.0), 0, 255).astype(np.uint8)
    images = images[:, 0] if ds.channels == 1 else images.transpose(0, 2, 3, 1)
    labels = ds.labels.reshape(-1, 1)
    labels = labels.astype(np.uint8 if len(labels) == 0 or labels.max() < 256 else np.int64)
    out = {f"{split}_images": images, f"{split}_labels": labels}
    if ds.patient_ids is not None:
        out[f"{split}_patient_ids"] = ds.patient_ids
    return out
