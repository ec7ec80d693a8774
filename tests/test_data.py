"""Site data intake: the bundled PneumoniaMNIST file, synthetic npz files and real PNG/JPEG folders."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.data import DataError, ImageDataset, load_dataset, load_image_folder, load_npz, save_npz

BUNDLED = Path(__file__).resolve().parents[1] / "simulations" / "data" / "pneumoniamnist.npz"


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_arrays(n=6, size=10, rgb=False):
    rng = np.random.default_rng(0)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    return {"train_images": rng.integers(0, 256, shape, dtype=np.uint8),
            "train_labels": (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)}


def test_bundled_pneumoniamnist_all_splits():
    with np.load(BUNDLED) as z:
        raw = {k: z[k] for k in z.files}
    for split, n in [("train", 4708), ("val", 524), ("test", 624)]:
        ds = load_dataset(BUNDLED, split=split)
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == np.float32
        assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 and ds.images.max() > 0.9
        assert ds.classes == ["0", "1"] and ds.source == str(BUNDLED)
        assert (len(ds), ds.resolution, ds.channels) == (n, 28, 1)
        np.testing.assert_allclose(ds.images[:, 0], raw[f"{split}_images"] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(ds.labels, raw[f"{split}_labels"][:, 0])
    assert np.bincount(load_npz(BUNDLED).labels).tolist() == [1214, 3494]


def test_resize_to_32_keeps_range_and_brightness():
    native = load_npz(BUNDLED, split="val", resolution=None)
    big = load_npz(BUNDLED, split="val", resolution=32)
    assert native.resolution == 28 and big.images.shape == (524, 1, 32, 32)
    assert big.images.dtype == np.float32 and 0.0 <= big.images.min() and big.images.max() <= 1.0
    assert abs(big.images.mean() - native.images.mean()) < 0.01
    # the resized image is the same picture, not noise: per-image means track the originals
    assert np.corrcoef(big.images.mean(axis=(1, 2, 3)), native.images.mean(axis=(1, 2, 3)))[0, 1] > 0.99


def test_flat_labels_and_float_images_accepted(tmp_path):
    a = good_arrays()
    a["train_labels"] = a["train_labels"][:, 0].astype(np.int32)
    a["train_images"] = a["train_images"] / 255.0
    ds = load_npz(write_npz(tmp_path / "x.npz", **a), resolution=None)
    assert ds.images.shape == (6, 1, 10, 10) and ds.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_rgb_kept_channel_order_and_resized(tmp_path):
    a = good_arrays(rgb=True)
    a["train_images"][:] = 0
    a["train_images"][..., 0] = 255  # pure red
    ds = load_npz(write_npz(tmp_path / "rgb.npz", **a), resolution=16)
    assert ds.images.shape == (6, 3, 16, 16) and ds.channels == 3
    np.testing.assert_allclose(ds.images[:, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(ds.images[:, 1:], 0.0, atol=1e-5)


def test_image_folder_mixed_formats_and_sizes(tmp_path):
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    Image.new("L", (20, 30), 255).save(tmp_path / "normal" / "a.png")
    Image.new("RGB", (40, 40), (0, 0, 0)).save(tmp_path / "normal" / "b.JPG")
    Image.new("RGB", (64, 48), (255, 255, 255)).save(tmp_path / "pneumonia" / "c.jpeg", quality=95)
    # 16-bit PNG (X-ray exports): must be scaled, not clipped to white by a plain convert("L")
    Image.fromarray(np.full((33, 17), 16384, np.uint16)).save(tmp_path / "pneumonia" / "d16.png")
    (tmp_path / "pneumonia" / "notes.txt").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class
    Image.new("L", (8, 8)).save(tmp_path / ".ipynb_checkpoints" / "e.png")
    (tmp_path / "normal" / "._a.png").write_bytes(b"macOS resource fork")  # hidden file: not an image
    ds = load_dataset(tmp_path, resolution=28)
    assert ds.classes == ["normal", "pneumonia"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 1, 28, 28) and ds.images.dtype == np.float32
    np.testing.assert_allclose(ds.images.mean(axis=(1, 2, 3)), [1.0, 0.0, 1.0, 0.25], atol=0.02)
    assert load_image_folder(tmp_path, resolution=32).resolution == 32


def test_subset_keeps_metadata():
    ds = load_npz(BUNDLED, split="val")
    sub = ds.subset(np.array([3, 1, 4]))
    assert len(sub) == 3 and sub.classes == ds.classes and sub.source == ds.source
    np.testing.assert_array_equal(sub.images[1], ds.images[1])
    assert isinstance(sub, ImageDataset)


# each bad input: (name, arrays to write, words the message must contain besides the path)
def _bad_npz_cases():
    a = good_arrays
    yield "missing_keys", {"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.uint8)}, ["train_images", "'x'"]
    yield "wrong_shape_2d", {**a(), "train_images": np.zeros((6, 100), np.uint8)}, ["(6, 100)", "expected"]
    yield "wrong_shape_4ch", {**a(), "train_images": np.zeros((6, 8, 8, 4), np.uint8)}, ["(N, H, W, 3)"]
    yield "complex_dtype", {**a(), "train_images": np.zeros((6, 8, 8), np.complex64)}, ["complex64", "uint8"]
    yield "string_dtype", {**a(), "train_images": np.full((6, 8, 8), "a")}, ["dtype", "uint8"]
    yield "int16_dtype", {**a(), "train_images": np.zeros((6, 8, 8), np.int16)}, ["int16", "uint8"]
    yield "float_range", {**a(), "train_images": np.full((6, 8, 8), 255.0)}, ["[0, 1]"]
    yield "count_mismatch", {**a(), "train_labels": np.zeros((5, 1), np.uint8)}, ["6 images", "5 labels"]
    yield "empty_class", {**a(4), "train_labels": np.array([0, 0, 2, 2])}, ["empty class", "[1]"]
    yield "negative_label", {**a(), "train_labels": np.array([0, 1, -1, 0, 1, 0])}, ["negative", "-1"]
    yield "fractional_label", {**a(), "train_labels": np.full(6, 0.5)}, ["float64", "integer"]
    yield "multilabel", {**a(), "train_labels": np.zeros((6, 14), np.uint8)}, ["(6, 14)", "(N,)"]
    yield "empty_data", {"train_images": np.zeros((0, 8, 8), np.uint8),
                         "train_labels": np.zeros((0, 1), np.uint8)}, ["at least one"]


@pytest.mark.parametrize("name,arrays,words", list(_bad_npz_cases()), ids=[c[0] for c in _bad_npz_cases()])
def test_bad_npz_names_file_and_expectation(tmp_path, name, arrays, words):
    path = write_npz(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(DataError) as e:
        load_dataset(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_not_an_npz_and_missing_and_unsupported_paths(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello, this is not a zip archive")
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    csv = tmp_path / "data.csv"  # a .csv is a manifest (tests/test_intake.py): this one lacks its columns
    csv.write_text("a,b\n")
    txt = tmp_path / "data.txt"
    txt.write_text("a,b\n")
    for path, word in [(text, "npz"), (npy, "npz"), (tmp_path / "nope.npz", "does not exist"),
                       (tmp_path / "nope", "does not exist"), (csv, "missing column(s) ['file', 'label']"),
                       (txt, "unsupported")]:
        with pytest.raises(DataError) as e:
            load_dataset(path)
        assert str(path) in str(e.value) and word in str(e.value), str(e.value)
    assert issubclass(DataError, ValueError)


def test_bad_folders_name_the_folder_or_file(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    with pytest.raises(DataError, match="no class subfolders") as e:
        load_image_folder(root)
    assert str(root) in str(e.value)

    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.new("L", (8, 8)).save(root / "a" / "ok.png")
    with pytest.raises(DataError, match="empty class 'b'") as e:
        load_image_folder(root)
    assert str(root / "b") in str(e.value)

    (root / "b" / "x.png").write_bytes(b"\x89PNG garbage, not really an image" * 3)
    with pytest.raises(DataError, match="corrupt") as e:
        load_dataset(root)
    assert str(root / "b" / "x.png") in str(e.value)

    # a real PNG cut short: fails at decode time, after the header parsed fine
    good = root / "a" / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(good)
    (root / "b" / "x.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt") as e:
        load_dataset(root)
    assert str(e.value).startswith(str(root / "b" / "x.png"))

    with pytest.raises(DataError, match="resolution=None") as e:
        load_dataset(root, resolution=None)
    assert str(root) in str(e.value)


def test_save_npz_round_trip_is_atomic_and_medmnist_shaped(tmp_path):
    ds = load_npz(BUNDLED)
    train, holdout = ds.subset(np.arange(50)), ds.subset(np.arange(50, 60))
    out = tmp_path / "site0" / "data.npz"
    save_npz(out, train, holdout)
    assert [p.name for p in out.parent.iterdir()] == ["data.npz"]  # no temp files left behind
    with np.load(out) as raw:
        assert sorted(raw.files) == ["train_images", "train_labels", "val_images", "val_labels"]
        assert raw["train_images"].shape == (50, 28, 28) and raw["train_images"].dtype == np.uint8
        assert raw["train_labels"].shape == (50, 1) and raw["val_images"].shape == (10, 28, 28)
    back = load_npz(out)
    np.testing.assert_array_equal(back.images, train.images)
    np.testing.assert_array_equal(back.labels, train.labels)
    np.testing.assert_array_equal(load_npz(out, split="val").labels, holdout.labels)

    rgb = load_npz(write_npz(tmp_path / "rgb.npz", **good_arrays(rgb=True)), resolution=None)
    save_npz(out, rgb)  # overwrites in place
    with np.load(out) as raw:
        assert raw["train_images"].shape == (6, 10, 10, 3) and "val_images" not in raw.files
    np.testing.assert_array_equal(load_npz(out, resolution=None).images, rgb.images)
