"""``fedsynth generate``: sample synthetic images from a finished run folder.

Sampling is post-processing of the released weights, so it costs no privacy budget and touches no ledger.
Output is either a MedMNIST-style .npz or a folder of PNGs per class — the two formats a site's data
intake (client.data) reads, so synthetic data can be fed straight back into training or evaluation.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from client.data import ImageDataset, save_npz
from fedsynth.files import read_json_object
from fedsynth.config import RunConfig
from models import Generator, build_generator
from server.checkpoint import load_weights

BATCH = 1000  # bounds memory for large n; the single seeded generator keeps the stream independent of it


def generate(run_dir: Path, n: int, label: int | None, out: Path, seed: int) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if n < 1:
        raise ValueError(f"n (number of images) must be ≥ 1, got {n}")
    model, names = load_run(run_dir)
    if label is not None and not 0 <= label < model.num_classes:
        raise ValueError(f"label {label} is out of range: {run_dir / 'config.json'} has "
                         f"{model.num_classes} classes (0..{model.num_classes - 1}: {names})")
    images, labels = sample(model, n, label, seed)
    if out.suffix.lower() == ".npz":
        save_npz(out, ImageDataset(images, labels, names, f"generated from {run_dir}"))
    else:
        write_png_folder(out, images, labels, names)
    return out


def load_run(run_dir: Path) -> tuple[Generator, list[str]]:
    """The run's generator with its released weights, and its class names (one folder name per class)."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: run folder does not exist")
    cfg_path, weights_path = run_dir / "config.json", run_dir / "weights.safetensors"
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path}: missing; expected the run's config.json")
    values = read_json_object(cfg_path, "run settings")
    run = RunConfig.from_flower(values, source=str(cfg_path))  # ignores keys it doesn't know
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: missing; expected the run's final weights")
    model = build_generator(run.model, **run.model_kwargs())
    try:
        model.load_shared_weights(load_weights(weights_path))
    except ValueError as exc:
        raise ValueError(f"{weights_path}: doesn't fit the model in config.json ({exc})") from None
    model.eval()
    return model, class_names(values.get("class-names") or [], run.num_classes, cfg_path)


def class_names(names: list, num_classes: int, cfg_path: Path) -> list[str]:
    if not names:
        # zero-padded so that sorting the folder names (as load_image_folder does) keeps the class order
        width = len(str(num_classes - 1))
        return [str(c).zfill(width) for c in range(num_classes)]
    if not isinstance(names, list) or len(names) != num_classes or len(set(map(str, names))) != num_classes:
        raise ValueError(f"{cfg_path}: class-names must list {num_classes} distinct names, got {names!r}")
    for name in map(str, names):
        # each name becomes a folder: no paths, no hidden folders (load_image_folder skips those)
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ValueError(f"{cfg_path}: class-names entry {name!r} can't be a folder name")
    return [str(x) for x in names]


def sample(model: Generator, n: int, label: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((n,), label, dtype=torch.long) if label is not None else model.uniform_labels(n, g)
    images = [model.sample(len(y), y, generator=g) for y in labels.split(BATCH)]
    return torch.cat(images).clamp(0, 1).numpy().astype(np.float32), labels.numpy()


def write_png_folder(out: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """One subfolder per class that got images (an empty one would be rejected by load_image_folder).

    Written to a temp folder beside ``out`` and renamed into place, so a reader never sees half a set.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary shared output folder
    try:
        pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
        for i, (img, y) in enumerate(zip(pixels, labels)):
            folder = tmp / names[int(y)]
            folder.mkdir(exist_ok=True)
            plane = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)  # (H, W) gray or (H, W, 3) RGB
            Image.fromarray(plane).save(folder / f"{i:06d}.png")
        os.replace(tmp, out)  # replaces an empty folder too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
