"""The manifest: a CSV that lists a hospital's image files with their labels (and patient ids, and split).

Format (UTF-8, a header row, comma-separated; Excel's byte-order mark is fine)::

    file,label,patient_id,split
    dicom/p001/img1.dcm,1,P001,train
    dicom/p001/img2.dcm,1,P001,train
    volumes/p002.nii.gz,0,P002,val

- ``file`` (required): a DICOM, NIfTI (.nii/.nii.gz) or PNG/JPEG file, relative to the CSV's folder or absolute.
  Each file once: an image listed twice would count twice in training but once in the privacy accounting.
- ``label`` (required): an integer class id 0..K-1 — use ids, so every hospital numbers the classes alike — or
  a class name (names are numbered in sorted order, like class folders).
- ``patient_id`` (optional): overrides the DICOM header's PatientID; an empty cell falls back to the header.
- ``split`` (optional): ``train`` (the default for an empty cell), ``val`` (the site's local holdout) or ``test``.

No other columns: a misspelt ``patient_id`` column would silently change the unit of privacy.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .data import DataError

REQUIRED = ("file", "label")
OPTIONAL = ("patient_id", "split")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Entry:
    path: Path
    label: str
    patient_id: str | None
    split: str
    where: str  # "<csv> line N", for messages


def read_manifest(path: str | Path) -> list[Entry]:
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"{p}: manifest does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{p}: cannot read as a UTF-8 CSV manifest ({exc}); expected columns "
                        f"{list(REQUIRED)} and optionally {list(OPTIONAL)}") from None
    if not rows:
        raise DataError(f"{p}: empty manifest; expected a header row with columns {list(REQUIRED)}")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    dup = sorted({h for h in header if header.count(h) > 1})
    if missing or unknown or dup:
        problem = "; ".join(x for x in (f"missing column(s) {missing}" if missing else "",
                                        f"unknown column(s) {unknown}" if unknown else "",
                                        f"repeated column(s) {dup}" if dup else "") if x)
        raise DataError(f"{p} line 1 (header): {problem}; expected columns {list(REQUIRED)} and optionally "
                        f"{list(OPTIONAL)}")
    entries: list[Entry] = []
    seen: dict[Path, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines (a trailing newline in a spreadsheet export)
        where = f"{p} line {line}"
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} field(s); expected {len(header)} ({', '.join(header)})")
        cells = {h: cell.strip() for h, cell in zip(header, row)}
        for column in REQUIRED:
            if not cells[column]:
                raise DataError(f"{where}: column '{column}' is empty; expected a value")
        split = cells.get("split", "").lower() or "train"
        if split not in SPLITS:
            raise DataError(f"{where}: column 'split' is {cells['split']!r}; expected one of {list(SPLITS)}")
        file = Path(cells["file"])
        file = file if file.is_absolute() else p.parent / file
        key = Path(file).resolve()
        if key in seen:
            raise DataError(f"{where}: column 'file' {cells['file']!r} is already listed at {seen[key]}; "
                            "expected each file once")
        seen[key] = f"line {line}"
        entries.append(Entry(file, cells["label"], cells.get("patient_id") or None, split, where))
    if not entries:
        raise DataError(f"{p}: no rows after the header; expected one row per image file")
    return entries


def label_ids(entries: list[Entry], source: str, num_classes: int | None) -> tuple[list[int], list[str]]:
    """Class ids per entry and the class names: integer labels are ids; otherwise names in sorted order."""
    labels = [e.label for e in entries]
    if all(_is_int(x) for x in labels):
        ids = [int(x) for x in labels]
        bad = next((e for e, i in zip(entries, ids) if i < 0 or (num_classes is not None and i >= num_classes)), None)
        if bad is not None:
            top = f" below {num_classes}" if num_classes is not None else ""
            raise DataError(f"{bad.where}: column 'label' is {bad.label}; expected a class id ≥ 0{top}")
        if num_classes is None:  # as for an .npz: a gap in the ids is more likely a typo than an empty class
            gaps = sorted(set(range(max(ids) + 1)) - set(ids))
            if gaps:
                raise DataError(f"{source}: column 'label' has no rows with class id(s) {gaps} below the largest, "
                                f"{max(ids)}; expected every id from 0 to the largest to occur")
        count = num_classes if num_classes is not None else max(ids) + 1
        return ids, [str(i) for i in range(count)]
    names = sorted(set(labels))
    if num_classes is not None and len(names) > num_classes:
        raise DataError(f"{source}: column 'label' has {len(names)} class names {names}; the run has "
                        f"{num_classes} classes")
    return [names.index(x) for x in labels], names


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
