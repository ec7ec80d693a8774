"""The floor every generator family must beat: per-class DP mean images plus a few DP principal components.

The release (one Gaussian mechanism, run once per site)
    Each image is average-pooled by ``coarse``, flattened to x ∈ R^d, centred on mid-grey (0.5, a public
    constant) and clipped to L2 norm C. Per class c the site computes the sum S_c = Σ x, the count n_c and
    (when components are wanted) the second moment M_c = Σ x xᵀ, and releases them with Gaussian noise
    (Analyze Gauss, Dwork et al. 2014: noise on the upper triangle of M_c, mirrored, so M_c stays symmetric).

Why one mechanism: adding or removing one image (x, y) changes only class y's block, by (x, 1, upper(x xᵀ)).
Scaling the three parts by a = √ρ_s / C, b = √ρ_n and g = √ρ_m / C² (ρ_s + ρ_n + ρ_m = 1: the budget shares)
makes the concatenated vector's L2 sensitivity ≤ √(a²‖x‖² + b² + g²‖x‖⁴) ≤ 1, since Σ_{i≤j} (x_i x_j)² ≤ ‖x‖⁴.
Adding N(0, σ²) to every scaled coordinate is then *one* Gaussian mechanism with sensitivity 1 — noise σ·C/√ρ_s
on the sums, σ/√ρ_n on the counts, σ·C²/√ρ_m on M — and its (ε, δ) is that of one step at sample rate 1 in
the project's accountant (``privacy.accountant``; PRV by default, which matches the analytic Gaussian
mechanism of Balle & Wang 2018, see tests/test_dp_pca.py). Everything after the release (means, covariance,
eigendecomposition, sampling) is post-processing.

Federated: each site releases its own noisy sums with its own (ε, δ); the server adds them (``combine``); the
noise variances add too and are carried along, public like σ and C.

The noise comes from numpy's seeded generator (reproducible, not cryptographically secure — the same
limitation as Opacus without ``secure_mode``, which needs torchcsprng, see DESIGN.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# The pooling, clipping and σ of a sensitivity-1 release are the class-mean release's (privacy/class_means.py);
# this module adds the second moments and the principal components.
from privacy.class_means import (CENTER, CLIP_PER_ROOT_DIM, COUNT_SHARE, clip_rows, default_clip,  # noqa: F401
                                 noise_multiplier, pooled_vectors, release_epsilon)

from .base import Generator

MEAN_SHARE_WITH_COMPONENTS = 0.45  # the rest (0.5) goes to the second moments


def budget_shares(with_second_moments: bool) -> dict[str, float]:
    """ρ per released part (they sum to 1): how the one mechanism's budget is split."""
    if not with_second_moments:
        return {"sums": 1.0 - COUNT_SHARE, "counts": COUNT_SHARE, "second-moments": 0.0}
    return {"sums": MEAN_SHARE_WITH_COMPONENTS, "counts": COUNT_SHARE,
            "second-moments": 1.0 - COUNT_SHARE - MEAN_SHARE_WITH_COMPONENTS}


def part_scales(clip: float, with_second_moments: bool) -> dict[str, float]:
    """Factors (a, b, g) that give the concatenated (a·S, b·n, g·upper(M)) an L2 sensitivity of at most 1."""
    rho = budget_shares(with_second_moments)
    return {"sums": math.sqrt(rho["sums"]) / clip, "counts": math.sqrt(rho["counts"]),
            "second-moments": math.sqrt(rho["second-moments"]) / clip ** 2}


def exact_moments(x: np.ndarray, labels: np.ndarray, num_classes: int,
                  with_second_moments: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-class (sums (K, d), counts (K,), second moments (K, d, d) or None) of already clipped rows ``x``."""
    sums = np.zeros((num_classes, x.shape[1]))
    counts = np.zeros(num_classes)
    second = np.zeros((num_classes, x.shape[1], x.shape[1])) if with_second_moments else None
    for c in range(num_classes):
        rows = x[labels == c]
        sums[c], counts[c] = rows.sum(0), len(rows)
        if second is not None:
            second[c] = rows.T @ rows
    return sums, counts, second


def scaled_vector(sums: np.ndarray, counts: np.ndarray, second: np.ndarray | None, clip: float) -> np.ndarray:
    """The release as the one vector the Gaussian mechanism perturbs: (a·S, b·n, g·upper-triangle(M)).

    Its L2 sensitivity under adding/removing one clipped image is ≤ 1 (module docstring)."""
    s = part_scales(clip, second is not None)
    parts = [s["sums"] * sums.ravel(), s["counts"] * counts.ravel()]
    if second is not None:
        iu = np.triu_indices(second.shape[1])
        parts.append(s["second-moments"] * second[:, iu[0], iu[1]].ravel())
    return np.concatenate(parts)


@dataclass
class MomentRelease:
    """Noisy per-class statistics in the pooled, centred pixel space, plus what is public about their noise."""
    sums: np.ndarray  # (K, d)
    counts: np.ndarray  # (K,)
    second_moments: np.ndarray | None  # (K, d, d) symmetric, None when no components were asked for
    clip: float
    coarse: int
    channels: int
    resolution: int  # of the images before pooling
    noise_variance: dict[str, float]  # per coordinate of each part (sums over sites add)
    sites: list[dict] = field(default_factory=list)  # per site: ε, δ, σ, accountant, sensitivity, C, shares


def release_site(images: np.ndarray, labels: np.ndarray, num_classes: int, target_epsilon: float, delta: float,
                 with_second_moments: bool, coarse: int = 2, clip: float | None = None, seed: int = 0,
                 accountant: str = "prv", source: str = "site") -> MomentRelease:
    """One site's private release (its only privacy cost in this family). ``target_epsilon = inf``: no noise
    (the non-private reference). ``source`` names the data in errors."""
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64).reshape(-1)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise ValueError(f"{source}: images must be (N, C, H, H) with C in (1, 3), got {images.shape}")
    if len(labels) != len(images) or not len(images):
        raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels; expected one label per image, "
                         "at least one image")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{source}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{source}: pixel values must lie in [0, 1], got {images.min():g}..{images.max():g}")
    if not target_epsilon > 0:
        raise ValueError(f"{source}: epsilon must be > 0 (inf for no noise), got {target_epsilon}")
    if not 0 < delta < 1 / len(images):
        raise ValueError(f"{source}: delta must lie in (0, 1/N) = (0, {1 / len(images):.3g}), got {delta}")
    x = pooled_vectors(images, coarse)
    clip = default_clip(x.shape[1]) if clip is None else float(clip)
    if not clip > 0:
        raise ValueError(f"{source}: clip must be > 0, got {clip}")
    sums, counts, second = exact_moments(clip_rows(x, clip), labels, num_classes, with_second_moments)
    scales = part_scales(clip, with_second_moments)
    record = {"epsilon-target": target_epsilon, "delta": delta, "accountant": accountant, "clip": clip,
              "sensitivity": 1.0, "shares": budget_shares(with_second_moments), "mechanism":
              "Gaussian, one release of (sums, counts, second moments) scaled to L2 sensitivity 1, add/remove one"}
    if math.isinf(target_epsilon):
        sigma, eps = 0.0, math.inf
    else:
        sigma = noise_multiplier(target_epsilon, delta, accountant)
        eps = release_epsilon(sigma, delta, accountant)
    rng = np.random.default_rng(seed)
    std = {part: (sigma / scale if scale else 0.0) for part, scale in scales.items()}
    sums = sums + rng.normal(0.0, 1.0, sums.shape) * std["sums"]
    counts = counts + rng.normal(0.0, 1.0, counts.shape) * std["counts"]
    if second is not None:
        for c in range(num_classes):
            upper = np.triu(rng.normal(0.0, 1.0, second[c].shape)) * std["second-moments"]
            second[c] += upper + np.triu(upper, 1).T  # one draw per upper-triangle entry, mirrored
    return MomentRelease(sums, counts, second, clip, coarse, images.shape[1], images.shape[2],
                         {part: s ** 2 for part, s in std.items()},
                         [record | {"sigma": sigma, "epsilon": eps, "n-classes": num_classes}])


def combine(releases: list[MomentRelease]) -> MomentRelease:
    """The server's sum of the sites' releases (post-processing: no further privacy cost)."""
    if not releases:
        raise ValueError("dp_pca combine: no site releases")
    first = releases[0]
    for i, r in enumerate(releases[1:], 1):
        if (r.clip, r.coarse, r.channels, r.resolution, r.sums.shape) != (
                first.clip, first.coarse, first.channels, first.resolution, first.sums.shape):
            raise ValueError(f"dp_pca combine: release {i} has clip {r.clip}, coarse {r.coarse}, "
                             f"{r.channels}×{r.resolution}², sums {r.sums.shape}; expected those of release 0 "
                             f"({first.clip}, {first.coarse}, {first.channels}×{first.resolution}², "
                             f"{first.sums.shape})")
        if (r.second_moments is None) != (first.second_moments is None):
            raise ValueError(f"dp_pca combine: release {i} and release 0 disagree on releasing second moments")
    second = None if first.second_moments is None else sum(r.second_moments for r in releases)
    return MomentRelease(sum(r.sums for r in releases), sum(r.counts for r in releases), second, first.clip,
                         first.coarse, first.channels, first.resolution,
                         {k: sum(r.noise_variance[k] for r in releases) for k in first.noise_variance},
                         [s for r in releases for s in r.sites])


class DPPCAGenerator(Generator):
    """Per class: a mean image and the top-``components`` principal directions with their variances.

    Sampling: mean + Σ_j √λ_j z_j v_j with z ~ N(0, 1), upsampled to full resolution, clamped to [0, 1]. The
    parameters are buffers (the shared weights); they come from ``fit`` on a (combined) release, never from
    DP-SGD, so ``train_step`` refuses.
    """

    family = "dp_pca"

    def __init__(self, num_classes: int = 2, channels: int = 1, resolution: int = 28, components: int = 4,
                 coarse: int = 2):
        super().__init__(num_classes, channels, resolution)
        if resolution % coarse:
            raise ValueError(f"dp_pca: resolution {resolution} must be a multiple of coarse ({coarse})")
        self.coarse, self.components = coarse, components
        d = channels * (resolution // coarse) ** 2
        if not 0 <= components <= d:
            raise ValueError(f"dp_pca: components must lie in 0..{d}, got {components}")
        self.register_buffer("mean", torch.full((num_classes, d), CENTER))
        self.register_buffer("basis", torch.zeros(num_classes, components, d))
        self.register_buffer("variances", torch.zeros(num_classes, components))

    def fit(self, release: MomentRelease, shrink: bool = True) -> "DPPCAGenerator":
        """Means and top principal components from a release (post-processing).

        ``shrink``: subtract the noise's own spectral edge (2·√d·τ for symmetric Gaussian noise of entry std τ)
        from the eigenvalues before projecting them to ≥ 0, so directions the noise alone explains get no
        variance. τ is public (σ and C of every site), so this costs no privacy.
        """
        d = self.mean.shape[1]
        if release.sums.shape != (self.num_classes, d) or release.coarse != self.coarse:
            raise ValueError(f"dp_pca fit: release sums {release.sums.shape} at coarse {release.coarse}; expected "
                             f"({self.num_classes}, {d}) at coarse {self.coarse}")
        if self.components and release.second_moments is None:
            raise ValueError(f"dp_pca fit: {self.components} components need a release with second moments")
        counts = np.maximum(release.counts, 1.0)  # a noisy count can come out ≤ 0 for a tiny class
        means = release.sums / counts[:, None]
        self.mean.copy_(torch.as_tensor(means + CENTER, dtype=torch.float32))
        if not self.components:
            return self
        edge = 2 * math.sqrt(d) * math.sqrt(release.noise_variance["second-moments"])
        for c in range(self.num_classes):
            cov = release.second_moments[c] / counts[c] - np.outer(means[c], means[c])
            lam, vec = np.linalg.eigh((cov + cov.T) / 2)  # ascending
            lam, vec = lam[::-1][: self.components].copy(), np.ascontiguousarray(vec[:, ::-1][:, : self.components])
            lam = np.maximum(lam - (edge / counts[c] if shrink else 0.0), 0.0)
            self.basis[c] = torch.as_tensor(vec.T, dtype=torch.float32)
            self.variances[c] = torch.as_tensor(lam, dtype=torch.float32)
        return self

    def _full_resolution(self, flat: torch.Tensor) -> torch.Tensor:
        side = self.resolution // self.coarse
        x = flat.view(-1, self.channels, side, side)
        if self.coarse > 1:
            x = F.interpolate(x, scale_factor=self.coarse, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None):
        labels = self.uniform_labels(n, generator) if labels is None else torch.as_tensor(labels).long()
        z = torch.randn(n, self.components, generator=generator)
        flat = self.mean[labels] + torch.einsum("nk,nkd->nd", z * self.variances[labels].sqrt(), self.basis[labels])
        return self._full_resolution(flat).clamp(0, 1)

    @torch.no_grad()
    def loss(self, x, y):
        """Per-image squared error of the class's PCA reconstruction (pooled space): the white-box MIA score."""
        v = torch.as_tensor(pooled_vectors(x.detach().cpu().numpy(), self.coarse) + CENTER, dtype=torch.float32)
        centred = v - self.mean[y.long()]
        basis = self.basis[y.long()]
        coords = torch.einsum("nd,nkd->nk", centred, basis)
        return (centred - torch.einsum("nk,nkd->nd", coords, basis)).pow(2).sum(1)

    def train_step(self, private, optimizer, x, y, public=None):
        raise NotImplementedError("dp_pca is fitted once from a Gaussian-mechanism release (release_site, "
                                  "combine, fit), not trained with DP-SGD")


def fit_federated(sites: list[tuple[np.ndarray, np.ndarray]], num_classes: int, target_epsilon: float,
                  delta: float, components: int, coarse: int = 2, seed: int = 0, accountant: str = "prv",
                  clip: float | None = None) -> tuple[DPPCAGenerator, MomentRelease]:
    """Every site releases with its own seed (seed + site index), the server adds and fits."""
    releases = [release_site(x, y, num_classes, target_epsilon, delta, components > 0, coarse, clip, seed=seed + i,
                             accountant=accountant, source=f"site {i}") for i, (x, y) in enumerate(sites)]
    total = combine(releases)
    model = DPPCAGenerator(num_classes, total.channels, total.resolution, components, coarse)
    return model.fit(total), total
