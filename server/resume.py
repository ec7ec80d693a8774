"""Resume a run from its last complete checkpoint (``fedsynth simulate --resume RUN_DIR``).

A checkpoint is complete when ``checkpoints/round-NNN.json`` exists: it is written (atomically) after the
round's weights, so a process killed in between leaves only a ``.safetensors`` that is ignored. Each
checkpoint's JSON carries the run config, every round's metrics so far and the refusals, so the resumed
server rebuilds its bookkeeping exactly; the sites rebuild theirs from their own ledgers (a round charged
but never checkpointed is re-sent from the site's outbox, not charged again: client/outbox.py).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.config import RunConfig
from fedsynth.files import read_json_object

from .checkpoint import load_weights

NAME = re.compile(r"^round-(\d{3,})\.json$")


class CheckpointError(ValueError):
    """A run folder or checkpoint that can't be resumed from; names the file and what was expected."""


@dataclass
class Resumed:
    round: int = 0                                   # last complete round (0: none yet)
    weights: "OrderedDict[str, np.ndarray] | None" = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)


def run_config(run_dir: Path) -> RunConfig:
    """The run's config, as written when the run started (``RUN_DIR/config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected the config.json a run writes when it starts "
                              "(is this a fedsynth run folder?)")
    values = _json_object(path, "run settings")
    try:
        return RunConfig.from_flower(values, source=str(path))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def resumable_run(run_dir: Path) -> RunConfig:
    """``--resume RUN_DIR`` (simulation or deployment server): the run's config, which must point back at this
    folder (out-dir/run-id), so the checkpoints, metrics and the sites' σ plan (keyed by run id) all match."""
    run = run_config(Path(run_dir))
    if Path(run.run_dir).resolve() != Path(run_dir).resolve():
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: out-dir/run-id point to {run.run_dir}, not to this "
                              "folder; resume the run where it was written")
    return run


def last_checkpoint(run_dir: Path, run: RunConfig, reference: "OrderedDict[str, np.ndarray]") -> Resumed:
    """The last complete checkpoint of ``run`` (names and shapes must match ``reference``), or round 0."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted(((int(m.group(1)), p) for p in folder.glob("round-*.json") if (m := NAME.match(p.name))),
                   reverse=True) if folder.is_dir() else []
    if not found:
        return Resumed()
    rnd, path = found[0]
    meta = _json_object(path, "checkpoint metadata")
    for key, kind in (("round", int), ("run_id", str), ("rounds", list), ("refusals", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{path}: field {key!r} must be {kind.__name__}, got {meta.get(key)!r}")
    if meta["round"] != rnd:
        raise CheckpointError(f"{path}: field 'round' is {meta['round']}, but the file name says {rnd}")
    if meta["run_id"] != run.run_id:
        raise CheckpointError(f"{path}: checkpoint of run {meta['run_id']!r}, expected {run.run_id!r}")
    if rnd > run.rounds:
        raise CheckpointError(f"{path}: round {rnd} is past the run's {run.rounds} rounds")
    weights_path = path.with_suffix(".safetensors")
    try:
        weights = load_weights(weights_path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if list(weights) != list(reference) and sorted(weights) == sorted(reference):
        weights = OrderedDict((k, weights[k]) for k in reference)  # safetensors may store names sorted
    if list(weights) != list(reference):
        raise CheckpointError(f"{weights_path}: arrays {sorted(weights)[:4]}…; expected the {run.model} model's "
                              f"{list(reference)[:4]}…")
    for name, ref in reference.items():
        a = weights[name]
        if a.shape != ref.shape or not np.isfinite(a).all():
            raise CheckpointError(f"{weights_path}: array {name!r} is {a.shape} "
                                  f"{'with non-finite values' if a.shape == ref.shape else ''}; expected a finite "
                                  f"{ref.shape}")
    if not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in meta["rounds"]):
        raise CheckpointError(f"{path}: field 'rounds' must be a list of objects with an integer 'round'")
    return Resumed(rnd, weights, meta["rounds"], meta["refusals"])


def _json_object(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what, CheckpointError)
