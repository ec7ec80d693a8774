"""Which updates the server refuses to average: wrong layout, NaN/inf, or too far from the global model.

Plain FedAvg: every site's update is checked before it is averaged; a bad one is left out and logged with
the site that sent it (its charge stands: the update left the site, see client/site.py).

Under SecAgg+ the server never sees an individual update, only the masked sum, so it cannot tell which site
sent a bad one. There the checks are: each site refuses to send non-finite weights or weights outside the
SecAgg+ clipping range (client/client_app.py), and the server checks the *aggregate* here (layout, finite,
norm of the change) and keeps the previous global model when it fails.
"""
from __future__ import annotations

import numpy as np


def update_problem(arrays: list[np.ndarray], reference: list[np.ndarray], max_norm: float,
                   names_sha256: str | None = None, expected_names_sha256: str | None = None) -> str | None:
    """None if ``arrays`` may be averaged into ``reference`` (the current global model), else why not."""
    if expected_names_sha256 is not None and names_sha256 != expected_names_sha256:
        return (f"wrong names: the update's layout fingerprint {str(names_sha256)[:12]}… is not the model's "
                f"{expected_names_sha256[:12]}…")
    if len(arrays) != len(reference):
        return f"wrong number of arrays: {len(arrays)}, expected {len(reference)}"
    for i, (a, ref) in enumerate(zip(arrays, reference)):
        if tuple(np.shape(a)) != tuple(np.shape(ref)):
            return f"wrong shape for array {i}: {tuple(np.shape(a))}, expected {tuple(np.shape(ref))}"
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            return f"wrong dtype for array {i}: {np.asarray(a).dtype}, expected floating point"
    bad = [i for i, a in enumerate(arrays) if not np.isfinite(a).all()]
    if bad:
        return f"non-finite values (NaN/inf) in array(s) {bad}"
    norm = float(np.sqrt(sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(r, np.float64)) ** 2))
                             for a, r in zip(arrays, reference))))
    if not norm <= max_norm:
        return f"update norm {norm:.4g} beyond the bound {max_norm:g} (L2 of weights minus the global model)"
    return None
