"""Reproduce the shipped reference classifier: ``python -m simulations.train_classifier [--data PATH]``.

Writes ``simulations/data/classifier-<data hash>.safetensors``; the runner picks it up for that data set
(and trains + caches one itself for any other data set).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from client.data import load_dataset
from fedsynth.config import DEFAULT_DATA

from .runner import classifier_key, reference_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MedMNIST-style .npz or class-per-folder images")
    args = p.parse_args()
    torch.set_num_threads(2)
    train = load_dataset(args.data, "train")
    out = Path(__file__).parent / "data"
    model = reference_classifier(train, out)
    print(f"wrote {out / f'classifier-{classifier_key(train)}.safetensors'}")
    try:
        test = load_dataset(args.data, "test")
        pred = model.predict(test.images)
        per_class = [float((pred[test.labels == c] == c).mean()) for c in range(len(train.classes))]
        print(f"test accuracy {float((pred == test.labels).mean()):.3f}, per class {np.round(per_class, 3).tolist()}")
    except ValueError:
        pass  # no test split in this data set


if __name__ == "__main__":
    main()
