"""The site's outbox: the last update it released in a run, kept so a restarted server can get it again.

A server killed after a site was charged for round r, but before round r's aggregate reached a checkpoint,
asks for round r again when it resumes. Training again would be a second release (new noise: a second
charge, beyond the run's plan). Sending the very update already charged for is free: it is the same
post-processed output of the same charged DP steps. So the site keeps what it sent (beside its ledger, never
leaving the site otherwise) and re-sends it only when

- the ledger holds a charge for this (run, round) that released ``weights`` whose sha256 equals the file's, and
- the server's global weights are the ones the update was computed from (``input_sha256``) — the resumed
  server restarts from the same checkpoint, so they are; anything else is refused, nothing new leaves.

Written (atomically) before the charge: an outbox entry for an update that never left is harmless; a charge
without its outbox entry means the round is refused on resume (it stays charged, never charged twice).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedsynth.files import atomic_write
from privacy.ledger import weights_sha256

FOLDER = "outbox"


def outbox_path(ledger_path: Path, run_id: str, server_round: int) -> Path:
    return Path(ledger_path).parent / FOLDER / f"{run_id}.round-{server_round:04d}.safetensors"


def save_update(path: Path, arrays: list[np.ndarray], input_sha256: str) -> None:
    """Write the update (in order) with the hash of the global weights it was computed from; older rounds of
    the same run are removed (only the round in flight can be asked for again)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i:05d}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
    atomic_write(path, save(tensors, metadata={"input_sha256": input_sha256,
                                              "weights_sha256": weights_sha256(arrays)}))
    run_prefix = path.name.split(".round-")[0]
    for old in path.parent.glob(f"{run_prefix}.round-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)


def load_update(path: Path) -> tuple[list[np.ndarray], dict[str, str]] | None:
    """(arrays in order, metadata) or None when there is no readable entry (then the round is not replayed)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
        tensors = load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, OSError, struct.error):
        return None
    arrays = [tensors[k] for k in sorted(tensors)]
    if meta.get("weights_sha256") != weights_sha256(arrays):
        return None
    return arrays, meta


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (its JSON header)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})
