"""Atomic files for the server: safetensors weights + JSON metadata, written to a temp file then renamed."""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedsynth.files import atomic_write as atomic_write_bytes  # noqa: F401  (re-exported for callers)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode())


def save_weights(path: Path, weights: "OrderedDict[str, np.ndarray]", metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> "OrderedDict[str, np.ndarray]":
    try:
        return OrderedDict(load_file(str(path)))
    except Exception as exc:  # safetensors raises several types for bad files
        raise ValueError(f"{path}: not a readable safetensors weights file ({exc})") from None


def save_checkpoint(run_dir: Path, server_round: int, weights, meta: dict[str, Any]) -> Path:
    base = Path(run_dir) / "checkpoints" / f"round-{server_round:03d}"
    save_weights(base.with_suffix(".safetensors"), weights)
    write_json(base.with_suffix(".json"), {"round": server_round, **meta})
    return base
