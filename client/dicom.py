"""One DICOM file -> grayscale images in [0, 1] at the model's resolution, plus the PatientID from its header.

The steps follow the DICOM display pipeline (PS3.3 C.11), so the model sees what a radiologist's viewer shows:

1. decode the stored pixels (pydicom; 8-, 12- and 16-bit, signed or unsigned, any transfer syntax a pydicom
   decoder handles) — a multi-frame file gives one image per frame;
2. the modality transform: Rescale Slope / Intercept (or a Modality LUT) -> e.g. Hounsfield units for CT;
3. the window: Window Center / Width when the header has them (the first pair; LINEAR, LINEAR_EXACT or SIGMOID
   as VOI LUT Function says), else each frame's own min..max;
4. MONOCHROME1 (bright = low value, common for CR/DX X-ray) is inverted, so bright always means dense;
5. RGB / YBR files become gray by ITU-R BT.601 luma; each frame is resized (bilinear) to resolution × resolution.

Only the top-level Rescale and Window attributes are read (an enhanced multi-frame file that keeps them in its
functional groups falls back to min..max per frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from .data import _resize_plane  # one resize for every intake format

GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights Pillow's convert("L") uses
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class DicomImages:
    frames: np.ndarray  # float32 (F, H, W) in [0, 1]: one image per frame, windowed, bright = dense
    patient_id: str | None  # (0010,0020) PatientID, stripped; None when absent or blank


def is_dicom(path: Path) -> bool:
    """A .dcm/.dicom name, or the "DICM" marker after the 128-byte preamble (PACS exports often have no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def read_dicom(path: str | Path, resolution: int) -> DicomImages:
    """Raises ValueError (or pydicom's own errors) with the reason when the file can't be used."""
    ds = pydicom.dcmread(path)  # not force=True: a file without a DICOM header is not silently parsed
    if "PixelData" not in ds:
        raise ValueError("no pixel data (e.g. a DICOMDIR, report or presentation state)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in GRAY + COLOR:
        raise ValueError(f"photometric interpretation {photometric or 'missing'!r}; expected one of "
                         f"{list(GRAY + COLOR)}")
    pixels = ds.pixel_array  # YBR is converted to RGB here
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    pixels = pixels.reshape(frames, *pixels.shape[-3 if color else -2:])
    if color:
        values = pixels.astype(np.float64) @ LUMA  # display colours: no modality or VOI transform applies
        planes = [_min_max(v) for v in values]
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        window = _window(ds)
        planes = [_min_max(v) if window is None else _apply_window(v, *window) for v in values]
        if photometric == "MONOCHROME1":
            planes = [1.0 - p for p in planes]
    out = np.stack([_resize_plane(p.astype(np.float32), resolution) for p in planes])
    patient = str(ds.get("PatientID", "") or "").strip()
    return DicomImages(out, patient or None)


def _window(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window in the header, or None to fall back to min..max."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = ds.WindowCenter, ds.WindowWidth
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise ValueError(f"VOI LUT Function {function!r}; expected LINEAR, LINEAR_EXACT or SIGMOID")
    wide_enough = width >= 1 if function == "LINEAR" else width > 0
    if not (np.isfinite(center) and np.isfinite(width) and wide_enough):
        raise ValueError(f"window center {center} / width {width}; expected finite values and a width "
                         f"{'≥ 1' if function == 'LINEAR' else '> 0'} ({function})")
    return center, width, function


def _apply_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI LUT functions of PS3.3 C.11.2.1.2/3, mapped to [0, 1] instead of the display's bit range."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width == 1:  # LINEAR with width 1 is a threshold at center - 0.5
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _min_max(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("non-finite pixel values")
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)
