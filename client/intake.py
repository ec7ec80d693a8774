"""A hospital's own imaging files -> one ImageDataset: DICOM, NIfTI and PNG/JPEG, from a manifest or class folders.

Two layouts (``data-path`` in the node config):

- a manifest CSV (``client/manifest.py``), or a folder holding ``manifest.csv``: labels, patient ids, splits;
- a class-per-folder tree: ``ROOT/<class name>/.../<file>`` (any depth: DICOM exports nest by patient, study and
  series); classes are the folder names in sorted order; everything is the ``train`` split.

Formats: DICOM (``client/dicom.py``; by suffix or by its "DICM" marker), NIfTI (``client/nifti.py``; each volume
gives its non-empty slices along ``slice_axis``) and PNG/JPEG. A file that can't be read is skipped and listed
with the reason (a warning per file, and ``ImageDataset.skipped``); loading fails only when no file is usable.

Patient ids (the unit of privacy, ``client/patient.py``): the manifest's ``patient_id``, else the DICOM header's
PatientID. Images from one file (DICOM frames, NIfTI slices) always show the same person, so:

- no ids at all, one image per file: no patient ids — the unit is one image (and the site is warned);
- no ids at all, but some file gives several images: each file counts as one patient (``file:<path>``);
- ids for some files only: the others count as one patient per file (warned: fix the manifest).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import IMAGE_SUFFIXES, DataError, ImageDataset, _read_gray
from .dicom import is_dicom, read_dicom
from .manifest import read_manifest, label_ids
from .nifti import is_nifti, parse_axis, read_nifti

log = logging.getLogger("fedsynth.intake")
MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class _File:
    path: Path
    label: int
    patient_id: str | None  # from the manifest; the DICOM header's is used when this is None
    where: str


def is_medical_folder(path: Path) -> bool:
    """A folder this module reads: it holds a manifest.csv, or class folders with any DICOM or NIfTI file."""
    if (path / MANIFEST).is_file():
        return True
    return any(not f.name.lower().endswith(IMAGE_SUFFIXES) and (is_nifti(f) or is_dicom(f))
               for d in _class_dirs(path) for f in _files(d))


def load_manifest(path: str | Path, split: str = "train", resolution: int = 28, num_classes: int | None = None,
                  slice_axis: int | str = "axial") -> ImageDataset:
    p = Path(path)
    entries = read_manifest(p)
    ids, classes = label_ids(entries, str(p), num_classes)  # over every split, so the class numbering is shared
    files = [_File(e.path, i, e.patient_id, e.where) for e, i in zip(entries, ids) if e.split == split]
    if not files:
        raise DataError(f"{p}: no rows with split '{split}'; expected some (column 'split', empty means train)")
    return _load(files, p.parent, classes, str(p), resolution, slice_axis)


def load_medical_folder(path: str | Path, split: str = "train", resolution: int = 28,
                        num_classes: int | None = None, slice_axis: int | str = "axial") -> ImageDataset:
    p = Path(path)
    if (p / MANIFEST).is_file():
        return load_manifest(p / MANIFEST, split, resolution, num_classes, slice_axis)
    if split != "train":
        raise DataError(f"{p}: a class-per-folder layout has no '{split}' split; list the files in "
                        f"{p / MANIFEST} with a 'split' column to give the site one")
    dirs = _class_dirs(p)
    if not dirs:
        raise DataError(f"{p}: no class subfolders; expected {p}/<class name>/<DICOM, NIfTI or PNG/JPEG files>")
    if num_classes is not None and len(dirs) > num_classes:
        raise DataError(f"{p}: {len(dirs)} class folders {[d.name for d in dirs]}; the run has {num_classes} classes")
    files = []
    for label, d in enumerate(dirs):
        found = [_File(f, label, None, str(f)) for f in _files(d)]
        if not found:
            raise DataError(f"{d}: empty class '{d.name}': no files; expected at least one image file")
        files.extend(found)
    return _load(files, p, [d.name for d in dirs], str(p), resolution, slice_axis)


def _load(files: list[_File], root: Path, classes: list[str], source: str, resolution: int,
          slice_axis: int | str) -> ImageDataset:
    try:
        parse_axis(slice_axis)  # a wrong setting is the site's config, not a bad file: fail before reading any
    except ValueError as exc:
        raise DataError(f"{source}: {exc} (node config slice-axis)") from None
    images, labels, patients, per_file = [], [], [], []
    skipped: list[tuple[str, str]] = []
    for f in files:
        try:
            planes, header_id = _read(f.path, resolution, slice_axis)
        except Exception as exc:  # any decoder failure is one bad file at the site: list it, go on
            reason = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            skipped.append((str(f.path), reason))
            log.warning("%s: skipped (%s)", f.where, reason)
            continue
        images.append(planes)
        labels.append(np.full(len(planes), f.label, np.int64))
        patients.append(f.patient_id or header_id)
        per_file.append((f.path, len(planes)))
    if not images:
        shown = "; ".join(f"{path}: {why}" for path, why in skipped[:5])
        raise DataError(f"{source}: none of the {len(files)} files could be used ({shown}"
                        f"{'; …' if len(skipped) > 5 else ''}); expected readable DICOM, NIfTI or PNG/JPEG files")
    if skipped:
        log.warning("%s: skipped %d of %d files that could not be read; loaded the other %d", source,
                    len(skipped), len(files), len(files) - len(skipped))
    ids = _patient_ids(patients, per_file, root, source)
    return ImageDataset(np.concatenate(images)[:, None], np.concatenate(labels), classes, source, ids,
                        skipped=tuple(skipped))


def _read(path: Path, resolution: int, slice_axis: int | str) -> tuple[np.ndarray, str | None]:
    """(images (K, res, res) in [0, 1], the PatientID of a DICOM header or None)."""
    if not path.is_file():
        raise FileNotFoundError("file does not exist")
    if path.name.lower().endswith(IMAGE_SUFFIXES):
        return _read_gray(path, resolution)[None], None
    if is_nifti(path):
        return read_nifti(path, resolution, slice_axis), None
    if is_dicom(path):
        dicom = read_dicom(path, resolution)
        return dicom.frames, dicom.patient_id
    raise ValueError("not a DICOM (.dcm or a 'DICM' header), NIfTI (.nii/.nii.gz) or PNG/JPEG file")


def _patient_ids(patients: list[str | None], per_file: list[tuple[Path, int]], root: Path,
                 source: str) -> np.ndarray | None:
    """One id per image following the rules in the module docstring."""
    missing = sum(pid is None for pid in patients)
    if missing == len(patients) and all(n == 1 for _, n in per_file):
        log.warning("%s: no patient ids (no manifest column 'patient_id', no DICOM PatientID): the unit of "
                    "privacy is one image, so ε is per image — a patient with several images is protected less",
                    source)
        return None
    if missing == len(patients):
        log.warning("%s: no patient ids; the images of one file (frames, slices) show one person, so each file "
                    "counts as one patient", source)
    elif missing:
        log.warning("%s: %d of %d files have no patient id; each of them counts as its own patient — add their "
                    "ids (manifest column 'patient_id') if a patient has several", source, missing, len(patients))
    ids = np.concatenate([np.full(n, pid if pid is not None else f"file:{_relative(path, root)}")
                          for pid, (path, n) in zip(patients, per_file)])
    if len(np.unique(ids)) == 1 and len(per_file) > 1:
        log.warning("%s: all %d images carry the same patient id %r — was PatientID blanked by anonymization? "
                    "Then the site counts as a single patient", source, len(ids), str(ids[0]))
    return ids


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _class_dirs(path: Path) -> list[Path]:
    # hidden entries (.ipynb_checkpoints, macOS ._x resource forks) are never data
    return sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))
