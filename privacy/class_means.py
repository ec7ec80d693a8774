"""The class-mean release: a site's per-class mean images, once per run, as one Gaussian mechanism.

Why it exists: under DP-SGD the part of every family that the noise scrambles first is what tells the
classes apart (at ε = 1 a DP VAE drew pneumonia that looked normal; DP GANs and diffusion models collapsed one
class onto the other; BENCHMARKS.md), while per-class means are the statistic DP estimates most cheaply: a few
hundred coordinates, each a sum over every image of its class. A share of the site's budget buys them in one
release before round 1 (round 0); the server adds the sites' releases and sets the means as the family's
class prior (``models.base.Generator.set_class_means``); DP-SGD goes on from there with what is left.

The mechanism (add/remove one unit; ``units``: patient ids, else every image is its own unit)
    Each image is average-pooled by ``coarse``, flattened to x ∈ R^d, centred on mid-grey (0.5, a public
    constant) and clipped to L2 norm C (default 0.2·√d). A unit contributes v = (a·Σ x placed at each image's
    class, b·count per class) with a = √ρ_s / C, b = √ρ_n (ρ_s + ρ_n = 1), scaled down to ‖v‖ ≤ 1 when larger
    (only a patient with several images can be: one clipped image has ‖v‖² ≤ ρ_s + ρ_n = 1). The release is
    Σ_units v + N(0, σ² I): one Gaussian mechanism of L2 sensitivity 1, whose (ε, δ) is that of one step at
    sample rate 1 in the project's accountant — the ledger records it as (σ, 1.0, 1), composed with every
    other step the site ever took. Dividing by a and b gives noisy per-class sums (noise σ·C/√ρ_s per pixel)
    and counts (σ/√ρ_n); the means are their ratio (post-processing).

The noise comes from numpy's seeded generator (reproducible, not cryptographically secure — the same
limitation as Opacus without ``secure_mode``, see DESIGN.md).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np

CENTER = 0.5  # public centre of pixel values in [0, 1]
# Clip norm per √d: an image whose pixels deviate from mid-grey by RMS 0.2 is not clipped. Fixed after looking
# at the bundled (public stand-in) training split: the 75th percentile of ‖x − 0.5‖ is 0.20·√d at half
# resolution (median 0.17·√d).
CLIP_PER_ROOT_DIM = 0.2
COUNT_SHARE = 0.05  # counts are in the hundreds or more: a small share of the mechanism makes them accurate
# On the wire every value is divided by this public constant, so a site's sums and counts fit Flower SecAgg+'s
# clipping range (±8): up to 8 · 2**14 ≈ 131k images of one class per site (a site refuses to send more).
WIRE_SCALE = float(2 ** 14)
WIRE_NAMES = ("class-means",)  # the release travels as one array: its layout fingerprint (fedsynth/layout.py)


def default_clip(dim: int) -> float:
    return CLIP_PER_ROOT_DIM * math.sqrt(dim)


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, and each PRV bisection takes ~0.3 s
def noise_multiplier(target_epsilon: float, delta: float, accountant: str = "prv") -> float:
    """σ for a sensitivity-1 Gaussian release: one step at sample rate 1."""
    # Opacus is imported here, not at the top: the ServerApp imports this module, and importing Opacus calls
    # logging.basicConfig, which hides the ServerApp's own progress lines under `flwr run` (server_app.py).
    from .accountant import calibrate_sigma
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV's log(1 − q) at q = 1 is −inf, harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        return calibrate_sigma(target_epsilon, delta, sample_rate=1.0, steps=1, accountant=accountant)


@functools.lru_cache(maxsize=64)
def release_epsilon(sigma: float, delta: float, accountant: str = "prv") -> float:
    from .accountant import epsilon as accounted_epsilon
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return accounted_epsilon([(sigma, 1.0, 1)], delta, accountant)


def pooled_vectors(images: np.ndarray, coarse: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → (N, C·(H/coarse)·(W/coarse)) float64, average-pooled and centred on 0.5."""
    x = np.asarray(images, dtype=np.float64)
    n, c, h, w = x.shape
    if h % coarse or w % coarse:
        raise ValueError(f"image size {h}×{w} must be a multiple of coarse ({coarse})")
    x = x.reshape(n, c, h // coarse, coarse, w // coarse, coarse).mean((3, 5))
    return x.reshape(n, -1) - CENTER


def clip_rows(x: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def unit_weights(x: np.ndarray, labels: np.ndarray, units: np.ndarray | None, num_classes: int,
                 clip: float) -> np.ndarray:
    """Per image, the factor ≤ 1 that scales its unit's scaled contribution v to ‖v‖ ≤ 1 (1 for single images)."""
    if units is None:
        return np.ones(len(x))
    _, unit = np.unique(np.asarray(units), return_inverse=True)
    a, b = math.sqrt(1 - COUNT_SHARE) / clip, math.sqrt(COUNT_SHARE)
    sq = np.zeros(unit.max() + 1 if len(unit) else 0)
    for c in range(num_classes):  # ‖v‖² = Σ_c (a²‖Σ x‖² + b² n²) over the unit's images of class c
        sums = np.zeros((len(sq), x.shape[1]))
        rows = labels == c
        np.add.at(sums, unit[rows], x[rows])
        sq += a ** 2 * (sums ** 2).sum(1) + b ** 2 * np.bincount(unit[rows], minlength=len(sq)) ** 2
    return np.minimum(1.0, 1.0 / np.maximum(np.sqrt(sq), 1e-12))[unit]


@dataclass
class ClassMeanRelease:
    """Noisy per-class sums (K, d) and counts (K,) in the pooled, centred pixel space, and what is public about
    their noise (per-coordinate variances; sums over sites add)."""
    sums: np.ndarray
    counts: np.ndarray
    clip: float
    coarse: int
    sigma: float
    noise_variance: dict[str, float]

    def means(self) -> np.ndarray:
        return means_of(self.sums, self.counts)

    def to_wire(self) -> np.ndarray:
        """The one flat float32 vector a site sends: (sums, counts) / WIRE_SCALE."""
        return (np.concatenate([self.sums.ravel(), self.counts]) / WIRE_SCALE).astype(np.float32)


def means_of(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, d) mean images in [0, 1] from (summed) noisy sums and counts; a class whose noisy count is ≤ 1 is
    divided by 1 (post-processing, like every step after the release)."""
    return np.clip(sums / np.maximum(counts, 1.0)[:, None] + CENTER, 0.0, 1.0)


def wire_length(num_classes: int, dim: int) -> int:
    return num_classes * dim + num_classes


def from_wire(total: np.ndarray, num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The sum of the sites' wire vectors → (sums (K, d), counts (K,))."""
    total = np.asarray(total, dtype=np.float64).ravel() * WIRE_SCALE
    if total.shape != (wire_length(num_classes, dim),):
        raise ValueError(f"class-mean release: expected {wire_length(num_classes, dim)} values for {num_classes} "
                         f"classes × {dim} pixels (+ counts), got {total.size}")
    return total[: num_classes * dim].reshape(num_classes, dim), total[num_classes * dim:]


def release(images: np.ndarray, labels: np.ndarray, num_classes: int, sigma: float, coarse: int,
            clip: float | None = None, units: np.ndarray | None = None,
            rng: np.random.Generator | None = None, source: str = "site") -> ClassMeanRelease:
    """One site's release with noise multiplier ``sigma`` (0: exact, for tests and non-private references)."""
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64).reshape(-1)
    if images.ndim != 4 or len(labels) != len(images) or not len(images):
        raise ValueError(f"{source}: expected images (N, C, H, W) with one label each, N ≥ 1; got images "
                         f"{images.shape} and {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{source}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{source}: pixel values must lie in [0, 1], got {images.min():g}..{images.max():g}")
    if not sigma >= 0:
        raise ValueError(f"{source}: sigma must be ≥ 0, got {sigma}")
    x = pooled_vectors(images, coarse)
    clip = default_clip(x.shape[1]) if clip is None else float(clip)
    x = clip_rows(x, clip)
    w = unit_weights(x, labels, units, num_classes, clip)
    x = x * w[:, None]
    sums, counts = np.zeros((num_classes, x.shape[1])), np.zeros(num_classes)
    np.add.at(sums, labels, x)
    np.add.at(counts, labels, w)
    std = {"sums": sigma * clip / math.sqrt(1 - COUNT_SHARE), "counts": sigma / math.sqrt(COUNT_SHARE)}
    rng = rng or np.random.default_rng(0)
    sums = sums + rng.normal(0.0, 1.0, sums.shape) * std["sums"]
    counts = counts + rng.normal(0.0, 1.0, counts.shape) * std["counts"]
    return ClassMeanRelease(sums, counts, clip, coarse, float(sigma), {k: s ** 2 for k, s in std.items()})
