"""One NIfTI volume (.nii / .nii.gz) -> its non-empty 2-D slices along one axis, in [0, 1] at the model's resolution.

- Orientation: the volume is first turned to the closest canonical (RAS+) orientation, so the axis means the
  same anatomical direction for every file whatever its scanner's voxel order: 0 = sagittal, 1 = coronal,
  2 = axial (the default). Each slice is shown with its second in-plane axis pointing up.
- Intensity: per volume, the 0.5th..99.5th percentile of its voxels maps to 0..1 and everything outside is
  clipped — MR intensities have no absolute scale, and a few hot voxels must not turn the rest of the volume
  black. NaN voxels (masked-out regions) count as background (0).
- Empty slices are dropped: a slice is empty when fewer than 1% of its pixels are above 0.05 after the
  normalization (air above the head, slices outside the field of view).
- A 4-D file with one volume is read as 3-D; a real time series is refused (which volume would be meant?).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .data import _resize_plane  # one resize for every intake format

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
PERCENTILES = (0.5, 99.5)
EMPTY_LEVEL, EMPTY_SHARE = 0.05, 0.01  # a slice needs ≥ 1% of its pixels above 0.05 to be kept
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def parse_axis(value: int | str) -> int:
    """0/1/2 or sagittal/coronal/axial (after reorientation to RAS+)."""
    text = str(value).strip().lower()
    if text in AXES:
        return AXES[text]
    if text in ("0", "1", "2"):
        return int(text)
    raise ValueError(f"slice axis {value!r}; expected 0, 1, 2 or one of {list(AXES)}")


def read_nifti(path: str | Path, resolution: int, axis: int | str = "axial") -> np.ndarray:
    """float32 (S, resolution, resolution): the volume's non-empty slices. Raises ValueError with the reason."""
    axis = parse_axis(axis)
    img = nib.as_closest_canonical(nib.load(str(path)))
    volume = np.asarray(img.get_fdata(dtype=np.float32))  # applies the header's scl_slope / scl_inter
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"a {volume.ndim}-D image shaped {volume.shape}; expected one 3-D volume")
    finite = volume[np.isfinite(volume)]  # NaNs must not shift the percentiles
    if finite.size == 0:
        raise ValueError("no finite voxel values")
    lo, hi = np.percentile(finite, PERCENTILES)
    if hi <= lo:
        raise ValueError(f"a constant volume (value {lo:g} almost everywhere); nothing to learn from")
    unit = np.nan_to_num(np.clip((volume - lo) / (hi - lo), 0.0, 1.0), nan=0.0)
    slices = np.moveaxis(unit, axis, 0)
    kept = [np.rot90(s) for s in slices if np.mean(s > EMPTY_LEVEL) >= EMPTY_SHARE]
    if not kept:
        raise ValueError(f"every slice along axis {axis} is empty (fewer than {EMPTY_SHARE:.0%} of pixels "
                         f"above {EMPTY_LEVEL})")
    return np.stack([_resize_plane(np.ascontiguousarray(s, dtype=np.float32), resolution) for s in kept])
