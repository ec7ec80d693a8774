"""Sampling synthetic images from a run folder into the two formats the data intake reads back."""
import json

import numpy as np
import pytest

from client.data import load_image_folder, load_npz
from fedsynth.config import RunConfig
from models import build_generator
from server.checkpoint import save_weights
from simulations.generate import generate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as server/run_folder.py leaves it, with a randomly initialised generator."""
    d = tmp_path_factory.mktemp("run")
    run = RunConfig(width=8, latent_dim=4)  # small: sampling speed is all that matters here
    model = build_generator("vae", **run.model_kwargs())
    save_weights(d / "weights.safetensors", model.shared_weights())
    (d / "config.json").write_text(json.dumps({**run.to_flower(), "class-names": ["normal", "pneumonia"]}))
    return d


def test_npz_with_fixed_label(run_dir, tmp_path):
    out = generate(run_dir, 1003, 1, tmp_path / "syn.npz", seed=0)  # > one batch of 1000
    ds = load_npz(out, num_classes=2)  # class 0 is absent, so the label set must be given
    assert ds.images.shape == (1003, 1, 28, 28) and (ds.labels == 1).all()
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0


def test_npz_uniform_labels_and_seed(run_dir, tmp_path):
    a = load_npz(generate(run_dir, 200, None, tmp_path / "a.npz", seed=3), num_classes=2)
    b = load_npz(generate(run_dir, 200, None, tmp_path / "b.npz", seed=3), num_classes=2)
    assert set(a.labels.tolist()) == {0, 1}
    np.testing.assert_array_equal(a.images, b.images)


def test_png_folder_reads_back(run_dir, tmp_path):
    out = generate(run_dir, 30, None, tmp_path / "pngs", seed=1)
    ds = load_image_folder(out)
    assert ds.classes == ["normal", "pneumonia"] and len(ds) == 30
    with pytest.raises(ValueError, match="not an empty folder"):
        generate(run_dir, 5, None, out, seed=1)


@pytest.mark.parametrize("label", [2, -1])
def test_bad_label(run_dir, tmp_path, label):
    with pytest.raises(ValueError, match="out of range"):
        generate(run_dir, 5, label, tmp_path / "x.npz", seed=0)


def test_bad_inputs(run_dir, tmp_path):
    with pytest.raises(ValueError, match="n .* must be ≥ 1"):
        generate(run_dir, 0, None, tmp_path / "x.npz", seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        generate(tmp_path / "no-run", 5, None, tmp_path / "x.npz", seed=0)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="weights.safetensors"):
        generate(bare, 5, None, tmp_path / "x.npz", seed=0)
    (bare / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        generate(bare, 5, None, tmp_path / "x.npz", seed=0)
