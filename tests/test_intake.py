"""Hospital imaging intake: real DICOM and NIfTI files shipped with pydicom and nibabel, DICOM edge cases written
as real files with pydicom, NIfTI volumes written with nibabel, manifests, and patient ids reaching the site."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from client.client_app import SiteClient
from client.data import DataError, load_dataset
from client.site import Site, SiteConfig
from fedsynth.config import RunConfig
from models import build_generator
from privacy.ledger import Ledger

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def shipped_dicom(name: str) -> Path:
    path = get_testdata_file(name, download=False)  # never download: these ship inside the pydicom wheel
    assert path is not None, f"{name} is not in the installed pydicom"
    return Path(path)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16,
                **attrs) -> Path:
    """A real DICOM file (Secondary Capture, explicit VR little endian) holding ``pixels`` ((H, W) or (F, H, W))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h=16, w=16, lo=0, hi=4000, dtype=np.uint16) -> np.ndarray:
    return np.linspace(lo, hi, h * w).reshape(h, w).round().astype(dtype)


def min_max(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x - x.min()) / (x.max() - x.min())


def one_class(tmp_path: Path, *files: tuple[str, np.ndarray, dict]) -> Path:
    root = tmp_path / "site"
    for name, pixels, attrs in files:
        write_dicom(root / "cls" / name, pixels, **attrs)
    return root


# --- real files --------------------------------------------------------------------------------------
def test_real_ct_and_mr_from_pydicom(tmp_path):
    ct, mr = shipped_dicom("CT_small.dcm"), shipped_dicom("MR_small.dcm")
    root = tmp_path / "site"
    (root / "ct").mkdir(parents=True)
    (root / "mr" / "study1").mkdir(parents=True)
    (root / "ct" / "image.dcm").write_bytes(ct.read_bytes())
    (root / "mr" / "study1" / "IM0001").write_bytes(mr.read_bytes())  # no suffix, as PACS exports: found by "DICM"

    ds = load_dataset(root, resolution=28)
    assert ds.images.shape == (2, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.labels.tolist() == [0, 1] and ds.classes == ["ct", "mr"]
    assert ds.patient_ids.tolist() == ["1CT1", "4MR1"]  # PatientID from the headers
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0

    # At native size the pixels are exact. CT_small: slope 1, intercept -1024, no window -> min..max of HU.
    raw_ct = pydicom.dcmread(ct).pixel_array.astype(np.float64) - 1024.0
    ct128 = load_dataset(root, resolution=128)  # CT at its native 128²
    np.testing.assert_allclose(ct128.images[0, 0], min_max(raw_ct), atol=1e-6)
    # MR_small: window center 600, width 1600 (DICOM LINEAR: (x - 599.5) / 1599 + 0.5, clipped)
    raw_mr = pydicom.dcmread(mr).pixel_array.astype(np.float64)
    mr64 = load_dataset(root, resolution=64)
    np.testing.assert_allclose(mr64.images[1, 0], np.clip((raw_mr - 599.5) / 1599 + 0.5, 0, 1), atol=1e-6)
    # the 28×28 image is the same picture
    small = np.asarray(Image.fromarray(min_max(raw_ct).astype(np.float32)).resize((28, 28), Image.BILINEAR))
    assert np.corrcoef(small.ravel(), ds.images[0, 0].ravel())[0, 1] > 0.99


def test_real_nifti_from_nibabel(tmp_path):
    root = tmp_path / "site"
    (root / "brain").mkdir(parents=True)
    (root / "brain" / "anatomical.nii").write_bytes((NIBABEL_DATA / "anatomical.nii").read_bytes())
    ds = load_dataset(root, resolution=28)  # default: axial slices of the RAS+-reoriented volume
    volume = nib.as_closest_canonical(nib.load(NIBABEL_DATA / "anatomical.nii")).get_fdata()
    assert volume.shape == (33, 41, 25)
    assert 0 < len(ds) <= 25 and ds.images.shape[1:] == (1, 28, 28)
    assert ds.labels.tolist() == [0] * len(ds) and ds.classes == ["brain"]
    # one volume is one person: its slices share one patient id
    assert set(ds.patient_ids.tolist()) == {"file:brain/anatomical.nii"}
    assert 0.0 <= ds.images.min() and ds.images.max() > 0.95  # (after resizing: 1.0 at native size)
    assert all((im > 0.05).mean() >= 0.01 for im in ds.images[:, 0])  # no empty slice kept
    sagittal = load_dataset(root, resolution=28, slice_axis="sagittal")
    assert 0 < len(sagittal) <= 33 and len(sagittal) != len(ds)
    # the middle axial slice is the volume's middle z-plane (rotated so anterior is up)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    plane = np.rot90(np.clip((volume[:, :, 12] - lo) / (hi - lo), 0, 1)).astype(np.float32)
    expected = np.asarray(Image.fromarray(plane).resize((28, 28), Image.BILINEAR))
    best = max(np.corrcoef(expected.ravel(), im.ravel())[0, 1] for im in ds.images[:, 0])
    assert best > 0.99


# --- DICOM edge cases, written as real files -----------------------------------------------------------
def test_monochrome1_gives_the_inverted_picture(tmp_path):
    pixels = ramp()
    root = one_class(tmp_path, ("a-mono2.dcm", pixels, {}), ("b-mono1.dcm", pixels, {"photometric": "MONOCHROME1"}))
    ds = load_dataset(root, resolution=16)
    np.testing.assert_allclose(ds.images[0, 0], min_max(pixels), atol=1e-6)
    np.testing.assert_allclose(ds.images[1, 0], 1.0 - min_max(pixels), atol=1e-6)


def test_rescale_then_window(tmp_path):
    pixels = ramp(lo=0, hi=2000)
    rescale = {"RescaleSlope": 2, "RescaleIntercept": -1000}
    root = one_class(tmp_path, ("w.dcm", pixels, {**rescale, "WindowCenter": 40, "WindowWidth": 401}),
                     ("r.dcm", pixels, rescale))
    ds = load_dataset(root, resolution=16)
    hu = 2.0 * pixels - 1000.0  # the modality transform first, then the window on HU
    np.testing.assert_allclose(ds.images[1, 0], np.clip((hu - 39.5) / 400 + 0.5, 0, 1), atol=1e-6)
    # without a window: min..max (a linear rescale alone does not change the picture)
    np.testing.assert_allclose(ds.images[0, 0], min_max(pixels), atol=1e-6)
    assert 0 < (ds.images[1, 0] == 0).mean() < 1 and 0 < (ds.images[1, 0] == 1).mean() < 1  # clipped both ends


@pytest.mark.parametrize("bits, dtype, lo, hi", [(8, np.uint8, 10, 200), (12, np.uint16, 0, 4095),
                                                 (16, np.uint16, 100, 65000), (16, np.int16, -2000, 3000)])
def test_8_12_16_bit_stored_values(tmp_path, bits, dtype, lo, hi):
    pixels = ramp(lo=lo, hi=hi, dtype=dtype)
    root = one_class(tmp_path, ("x.dcm", pixels, {"bits": bits, "WindowCenter": (lo + hi) / 2, "WindowWidth": hi - lo}))
    (back,) = (pydicom.dcmread(f) for f in (root / "cls").iterdir())
    assert (back.BitsStored, back.PixelRepresentation) == (bits, int(dtype == np.int16))
    image = load_dataset(root, resolution=16).images[0, 0]
    c, w = (lo + hi) / 2, hi - lo
    np.testing.assert_allclose(image, np.clip((pixels - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-6)


def test_multi_frame_gives_one_image_per_frame(tmp_path):
    frames = np.stack([ramp(), ramp()[::-1], ramp().T]).astype(np.uint16)
    root = one_class(tmp_path, ("cine.dcm", frames, {"PatientID": "P7"}), ("single.dcm", ramp(), {"PatientID": "P8"}))
    ds = load_dataset(root, resolution=16)
    assert len(ds) == 4 and ds.patient_ids.tolist() == ["P7", "P7", "P7", "P8"]
    for k in range(3):
        np.testing.assert_allclose(ds.images[k, 0], min_max(frames[k]), atol=1e-6)


def test_corrupt_files_are_skipped_and_named(tmp_path, caplog):
    root = one_class(tmp_path, ("good.dcm", ramp(), {}))
    good = root / "cls" / "good.dcm"
    (root / "cls" / "garbage.dcm").write_bytes(b"not a dicom file at all" * 20)
    (root / "cls" / "truncated.dcm").write_bytes(good.read_bytes()[:-200])  # pixel data cut short
    with caplog.at_level(logging.WARNING, logger="fedsynth.intake"):
        ds = load_dataset(root, resolution=16)
    assert len(ds) == 1
    skipped = dict(ds.skipped)
    assert sorted(skipped) == [str(root / "cls" / "garbage.dcm"), str(root / "cls" / "truncated.dcm")]
    assert all(reason for reason in skipped.values())
    assert "DICM" in skipped[str(root / "cls" / "garbage.dcm")]
    text = caplog.text
    assert "skipped 2 of 3 files" in text and "garbage.dcm" in text and "truncated.dcm" in text
    good.unlink()
    with pytest.raises(DataError, match="none of the 2 files could be used") as e:
        load_dataset(root, resolution=16)
    assert "garbage.dcm" in str(e.value) and "truncated.dcm" in str(e.value)


# --- NIfTI edge cases ------------------------------------------------------------------------------------
def test_nifti_percentile_normalization_and_empty_slices(tmp_path):
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 20, 10), np.float32)
    volume[3:17, 3:17, 2:8] = rng.uniform(100, 200, (14, 14, 6))  # z-slices 0, 1, 8, 9 are empty
    volume[10, 10, 5] = 1e6  # one hot voxel must not turn everything else black
    root = tmp_path / "site"
    (root / "scan").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "scan" / "v.nii.gz")
    time_series = np.repeat(volume[..., None], 3, axis=3)
    nib.save(nib.Nifti1Image(time_series, np.eye(4)), root / "scan" / "fmri.nii.gz")
    ds = load_dataset(root, resolution=20)
    assert len(ds) == 6  # axial: only z = 2..7 are kept
    assert dict(ds.skipped)[str(root / "scan" / "fmri.nii.gz")].endswith("expected one 3-D volume")
    inside = ds.images[:, 0, 4:16, 4:16]  # rot90 of the 3..17 square stays the 3..17 square
    assert inside.mean() > 0.2 and ds.images.max() == 1.0
    lo, hi = np.percentile(volume, [0.5, 99.5])  # independent of the loader: the expected mapping
    np.testing.assert_allclose(ds.images[0, 0], np.rot90(np.clip((volume[:, :, 2] - lo) / (hi - lo), 0, 1)),
                               atol=1e-5)
    assert len(load_dataset(root, resolution=20, slice_axis=0)) == 14  # x = 3..16 hold data
    with pytest.raises(DataError, match="slice axis 'oblique'"):
        load_dataset(root, resolution=20, slice_axis="oblique")


# --- manifests -------------------------------------------------------------------------------------------
def test_manifest_labels_patients_splits_and_formats(tmp_path):
    root = tmp_path / "hospital"
    write_dicom(root / "dcm" / "a.dcm", ramp(), PatientID="HEADER-A")
    write_dicom(root / "dcm" / "b.dcm", ramp()[::-1], PatientID="HEADER-B")
    write_dicom(root / "dcm" / "c.dcm", ramp().T)  # no PatientID in its header
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(root / "png.png")
    (root / "manifest.csv").write_text(
        "\ufefffile,label,patient_id,split\n"  # Excel's byte-order mark
        "dcm/a.dcm,1,,train\n"                 # empty patient_id: the header's
        "dcm/b.dcm,0,P9,\n"                     # manifest overrides the header; empty split is train
        "png.png,1,P9,train\n"
        "\n"
        "dcm/c.dcm,0,P3,val\n"
        "missing.dcm,0,P4,train\n")
    train = load_dataset(root / "manifest.csv", "train", resolution=16)
    assert len(train) == 3 and train.labels.tolist() == [1, 0, 1] and train.classes == ["0", "1"]
    assert train.patient_ids.tolist() == ["HEADER-A", "P9", "P9"]
    assert dict(train.skipped)[str(root / "missing.dcm")] == "FileNotFoundError: file does not exist"
    val = load_dataset(root, "val", resolution=16)  # a folder holding manifest.csv uses it
    assert len(val) == 1 and val.patient_ids.tolist() == ["P3"] and val.source == str(root / "manifest.csv")
    with pytest.raises(DataError, match="no rows with split 'test'"):
        load_dataset(root, "test", resolution=16)

    (root / "names.csv").write_text("file,label\ndcm/a.dcm,pneumonia\ndcm/b.dcm,normal\n")
    named = load_dataset(root / "names.csv", resolution=16)
    assert named.classes == ["normal", "pneumonia"] and named.labels.tolist() == [1, 0]


@pytest.mark.parametrize("text, where, words", [
    ("path,label\nx.dcm,0\n", "line 1", ["missing column(s) ['file']"]),
    ("file,label,patient\nx.dcm,0,P1\n", "line 1", ["unknown column(s) ['patient']", "patient_id"]),
    ("file,label\nx.dcm,0\ny.dcm,-1\n", "line 3", ["column 'label'", "-1", "≥ 0"]),
    ("file,label\nx.dcm,0\ny.dcm,2\n", "line 3", ["column 'label'", "below 2"]),
    ("file,label\nx.dcm,\n", "line 2", ["column 'label' is empty"]),
    ("file,label,split\nx.dcm,0,holdout\n", "line 2", ["column 'split'", "'holdout'", "'val'"]),
    ("file,label\nx.dcm,0\n./x.dcm,1\n", "line 3", ["column 'file'", "already listed at line 2"]),
    ("file,label\nx.dcm,0,extra\n", "line 2", ["3 field(s); expected 2"]),
    ("", "", ["empty manifest"]),
])
def test_manifest_errors_name_file_line_and_column(tmp_path, text, where, words):
    csv = tmp_path / "manifest.csv"
    csv.write_text(text)
    with pytest.raises(DataError) as e:
        load_dataset(csv, resolution=16, num_classes=2)
    message = str(e.value)
    assert message.startswith(f"{csv} {where}" if where else f"{csv}:"), message
    for w in words:
        assert w in message, (w, message)


def test_manifest_class_ids_with_a_gap_are_refused_without_a_known_class_count(tmp_path):
    csv = tmp_path / "manifest.csv"
    csv.write_text("file,label\nx.dcm,0\ny.dcm,2\n")
    with pytest.raises(DataError, match=r"column 'label' has no rows with class id\(s\) \[1\]") as e:
        load_dataset(csv, resolution=16)
    assert str(e.value).startswith(f"{csv}:")


# --- patient ids reach the site ----------------------------------------------------------------------------
def test_site_unit_follows_the_intakes_patient_ids(tmp_path, caplog):
    root = tmp_path / "hospital"
    rng = np.random.default_rng(1)
    rows = ["file,label,patient_id"]
    for k in range(24):
        write_dicom(root / "img" / f"{k:02d}.dcm", rng.integers(0, 4096, (32, 32)).astype(np.uint16), bits=12)
        rows.append(f"img/{k:02d}.dcm,{k % 2},P{k // 3}")  # 8 patients, 3 images each
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = RunConfig(run_id="intake", rounds=1, local_epochs=0.2, sample_rate=0.25, epsilon=3.0, delta=0.05)
    node = {"data-path": str(root), "ledger-path": str(tmp_path / "ledger" / "ledger.jsonl"), "site-name": "h1"}
    site = Site(SiteConfig.from_node_config(node, run), run.resolution, run.num_classes)
    assert site.train.images.shape == (24, 1, 28, 28) and (site.unit, site.units()) == ("patient", 8)
    assert site.holdout is None  # the manifest has no val rows

    # the real client trains on it: the plan and the charge name the patient unit, δ is checked per patient
    weights = list(build_generator(run.model, **run.model_kwargs()).shared_weights().values())
    SiteClient(node).fit(weights, {**run.to_flower(), "server-round": 1})
    (charge,) = Ledger(tmp_path / "ledger" / "ledger.jsonl").charges()
    assert charge["unit"] == "patient" and charge["released"] == "weights"

    # the same images without ids: the unit is one image, and the site is told its ε is per image
    (root / "manifest.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="fedsynth.intake"):
        site = Site(SiteConfig.from_node_config(node, run), run.resolution, run.num_classes)
    assert site.unit == "image" and "ε is per image" in caplog.text
