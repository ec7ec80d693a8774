"""``fedsynth simulate --audit-canaries M``: plant M canaries at one simulated hospital, train as usual, then
bound ε from below with the one-run audit (``privacy.canary_audit``) and report it next to the accounted ε.

Canary design: each canary is an image of independent fair coin-flip pixels (0 or 1) with the fixed label 0.
Chest X-rays are smooth and mid-grey, so a canary is far out of distribution: nothing else in the data pulls
the model toward it, and its own clipped gradient is the only thing that can lower its loss — that is what
gives the audit power. Two such images share half their pixels by chance only, so a model that fits one
canary learns little about another (the guesses stay nearly independent).

Where things live (the simulated hospital's IT plants them; the coordinator never sees which were used):
- ``STATE_DIR/site-0/canaries/RUN_ID.npz``: every canary (``images``, ``labels``) and ``included`` — which ones
  site-0 trains on (each with probability ½, from the run's seed). It stays in the site's folder.
- ``RUN_DIR/canary-audit.json`` and site-0's entry in ``privacy.json``: only the counts and the bound.

Score: the white-box membership score of the release report, −(the released model's own per-image loss)
(VAE: −ELBO, GAN: −discriminator loss on the image as real, diffusion: −denoising error of the EMA model),
averaged over 4 noise draws. The bound is checked against the ε that site-0's ledger charged for this run (the
steps that touched the canaries); a bound above it means the accounting or the DP implementation is wrong.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from client.data import DataError, ImageDataset
from fedsynth.config import RunConfig
from fedsynth.files import atomic_write
from privacy.accountant import epsilon
from privacy.canary_audit import BETA, audit
from privacy.ledger import Ledger

CANARY_SITE = "site-0"
CANARY_LABEL = 0
SEED_STREAM = 0xCA4A  # the canaries' own random stream, apart from partitions and training noise
REPORT = "canary-audit.json"


def canary_file(state_dir: str | Path, run_id: str) -> Path:
    return Path(state_dir) / CANARY_SITE / "canaries" / f"{run_id}.npz"


def make_canaries(m: int, channels: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (m, C, H, W) float32 in {0, 1}, labels (m,) all CANARY_LABEL, included (m,) bool)."""
    rng = np.random.default_rng([seed, SEED_STREAM])
    images = (rng.random((m, channels, resolution, resolution)) < 0.5).astype(np.float32)
    included = rng.random(m) < 0.5
    return images, np.full(m, CANARY_LABEL, dtype=np.int64), included


def plant_canaries(run: RunConfig) -> Path | None:
    """Write site-0's canary file for this run (nothing when the audit is off). Deterministic for a seed."""
    if not run.audit_canaries:
        return None
    images, labels, included = make_canaries(run.audit_canaries, run.channels, run.resolution, run.seed)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, labels=labels, included=included)
    path = canary_file(run.state_dir, run.run_id)
    atomic_write(path, buf.getvalue())
    return path


def read_canaries(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, included) from a canary file; a bad file is named with what was expected."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, included = z["images"], z["labels"], z["included"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a canary file ({exc}); expected an .npz with images (M, C, H, W), "
                        "labels (M,) and included (M,) bool, written by `fedsynth simulate --audit-canaries`") from None
    m = len(images)
    if images.ndim != 4 or labels.shape != (m,) or included.shape != (m,) or included.dtype != np.bool_:
        raise DataError(f"{path}: canary arrays shaped images {images.shape}, labels {labels.shape}, included "
                        f"{included.shape} ({included.dtype}); expected (M, C, H, W), (M,) and (M,) bool")
    return images.astype(np.float32), labels.astype(np.int64), included


def with_canaries(train: ImageDataset, path: Path) -> ImageDataset:
    """The site's training images plus the canaries its file marks as included (each its own patient, if the
    site's unit is the patient), so DP-SGD samples and clips them like any other unit."""
    images, labels, included = read_canaries(path)
    if images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"{path}: canaries shaped {images.shape[1:]}, the site's images {train.images.shape[1:]}")
    images, labels = images[included], labels[included]
    patients, ids = None, train.patient_ids
    if ids is not None and np.issubdtype(ids.dtype, np.integer):
        patients = np.concatenate([ids, ids.max() + 1 + np.arange(len(labels))])
    elif ids is not None:
        patients = np.concatenate([ids.astype(str), [f"canary-{i}" for i in range(len(labels))]])
    return ImageDataset(np.concatenate([train.images, images]), np.concatenate([train.labels, labels]),
                        list(train.classes), f"{train.source} + {len(labels)} canaries from {path}", patients)


def accounted_epsilon(run: RunConfig) -> tuple[float, float, float]:
    """(ε of this run's charges, ε over site-0's whole ledger, δ) at site-0's δ for this run."""
    ledger = Ledger(Path(run.state_dir) / CANARY_SITE / "ledger.jsonl")
    plan = ledger.plan(run.run_id) or {}
    delta, accountant = float(plan.get("delta", run.delta)), plan.get("accountant", run.accountant)
    this_run = [(c["sigma"], c["sample_rate"], c["steps"]) for c in ledger.charges() if c.get("run_id") == run.run_id]
    return epsilon(this_run, delta, accountant), ledger.epsilon(delta, accountant), delta


def canary_scores(run: RunConfig, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Membership scores of the released model (higher = looks trained on)."""
    from models import build_generator
    from server.checkpoint import load_weights

    from .metrics import whitebox_mia_scores

    model = build_generator(run.model, **run.model_kwargs())
    model.load_shared_weights(load_weights(run.run_dir / "weights.safetensors"))
    return whitebox_mia_scores(model, images, labels, seed=run.seed)


def run_canary_audit(run: RunConfig) -> dict | None:
    """Score the canaries, bound ε, and report it in the run folder (canary-audit.json, privacy.json, summary)."""
    if not run.audit_canaries:
        return None
    path = canary_file(run.state_dir, run.run_id)
    images, labels, included = read_canaries(path)
    run_eps, ledger_eps, delta = accounted_epsilon(run)
    result = audit(canary_scores(run, images, labels), included, delta=delta, beta=BETA)
    bound = result["epsilon-lower-bound"]
    result |= {"site": CANARY_SITE, "score": f"−loss(x, y) of the released {run.model} (white-box, mean of 4 draws)",
               "canary-design": "i.i.d. fair coin-flip pixels in {0, 1}, label 0 (out of distribution)",
               "epsilon-accounted-this-run": run_eps, "epsilon-accounted-ledger": ledger_eps,
               "exceeds-accounted": bool(bound > run_eps + 1e-9)}
    run_dir = run.run_dir
    atomic_write(run_dir / REPORT, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    privacy_file = run_dir / "privacy.json"
    privacy = json.loads(privacy_file.read_text())
    if CANARY_SITE in privacy:
        privacy[CANARY_SITE]["canary-audit"] = {k: result[k] for k in (
            "epsilon-lower-bound", "epsilon-accounted-this-run", "exceeds-accounted", "canaries", "confidence",
            "method")}
        atomic_write(privacy_file, (json.dumps(privacy, indent=2, sort_keys=True) + "\n").encode())
    summary = run_dir / "summary.txt"
    atomic_write(summary, (summary.read_text() + "".join(f"{line}\n" for line in summary_lines(result))).encode())
    return result


def summary_lines(result: dict) -> list[str]:
    best = result["best"]
    lines = ["", f"canary audit ({result['site']}, {result['canaries']} canaries, {result['included']} trained on): "
             f"empirical ε ≥ {result['epsilon-lower-bound']:.3f} at {result['confidence']:.0%} confidence "
             f"(δ={result['delta']:g}; best guess: {best['correct']}/{best['guesses']} correct, top {best['k-in']} "
             f"in / bottom {best['k-out']} out); accounted ε this run {result['epsilon-accounted-this-run']:.3f} "
             f"(whole ledger {result['epsilon-accounted-ledger']:.3f})"]
    if result["exceeds-accounted"]:
        lines.append(warning(result))
    return lines


def warning(result: dict) -> str:
    return (f"WARNING: the canary audit's lower bound ε ≥ {result['epsilon-lower-bound']:.3f} EXCEEDS the accounted "
            f"ε = {result['epsilon-accounted-this-run']:.3f} of {result['site']}: the privacy accounting or the DP "
            "implementation is wrong — do not release this model")
