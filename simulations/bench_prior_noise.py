"""Benchmark: how much the class-mean release's noise costs the class signal, with and without denoising.

``python -m simulations.bench_prior_noise [--seeds 0 1 2]`` releases the 4 sites' class means (bundled training
split, Dirichlet α = 0.5, as ``bench_release_table``) at the ε the release gets — 0.3 × ε = 1, 0.95 × ε = 1 (the
DP-PCA floor's share) and 0.3 × ε = 10 — and prints, per seed, for the exact, the noisy and a Wiener-filtered
noisy release: the L2 error of the (K, 14×14) mean images against the exact ones, and the AUC on the sites'
pooled local holdouts of the linear score ⟨x − (m₀ + m₁)/2, m₁ − m₀⟩ — what a classifier trained on samples
that all sit at their class mean can learn at best from the direction between the two.

The Wiener filter is post-processing with public facts only: per class, in the 2-D Fourier domain, the signal
power is the noisy power minus the release's own noise power (its σ, clip and the noisy count), clamped at 0.
"""
from __future__ import annotations

import argparse

import numpy as np

from client.data import load_dataset
from fedsynth.config import DEFAULT_DATA
from privacy.class_means import means_of, noise_multiplier, pooled_vectors, release

from .metrics import auc
from .partition import partition_sites

SITES, PARTITION, DELTA, COARSE = 4, "dirichlet:0.5", 1e-5, 2


def wiener(means: np.ndarray, noise_var: np.ndarray) -> np.ndarray:
    """Each (H, W) mean image shrunk per frequency by S / (S + N), S = max(|F|² − N, 0), N = n · its noise variance."""
    out = []
    for m, v in zip(means, noise_var):
        centre = m.mean()
        f = np.fft.fft2(m - centre)
        noise = m.size * v
        signal = np.maximum(np.abs(f) ** 2 - noise, 0.0)
        out.append(np.real(np.fft.ifft2(f * signal / (signal + noise + 1e-12))) + centre)
    return np.clip(np.array(out), 0.0, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    train = load_dataset(DEFAULT_DATA, "train")
    per_seed = {}  # seed -> (the sites, the pooled holdout vectors and labels, the exact means): one per seed
    for seed in args.seeds:
        parts = partition_sites(train.labels, SITES, PARTITION, seed)
        sites = [train.subset(s.train) for s in parts]
        holdout = train.subset(np.concatenate([s.holdout for s in parts]))
        exact = [release(s.images, s.labels, 2, 0.0, COARSE) for s in sites]
        per_seed[seed] = (sites, pooled_vectors(holdout.images, COARSE), holdout.labels,
                          means_of(sum(r.sums for r in exact), sum(r.counts for r in exact)))
    for release_eps, what in ((0.3, "share 0.3 of ε = 1"), (0.95, "share 0.95 of ε = 1"), (3.0, "share 0.3 of ε = 10")):
        sigma = noise_multiplier(release_eps, DELTA)
        for seed, (sites, x, y, m_exact) in per_seed.items():
            noisy = [release(s.images, s.labels, 2, sigma, COARSE, rng=np.random.default_rng(seed * 100 + i))
                     for i, s in enumerate(sites)]
            sums, counts = sum(r.sums for r in noisy), sum(r.counts for r in noisy)
            m_noisy = means_of(sums, counts)
            var = np.array([sum(r.noise_variance["sums"] for r in noisy) / max(c, 1.0) ** 2 for c in counts])
            side = int(round(np.sqrt(m_noisy.shape[1])))
            m_wiener = wiener(m_noisy.reshape(-1, side, side), var).reshape(m_noisy.shape)
            row = []
            for name, m in (("exact", m_exact), ("noisy", m_noisy), ("Wiener", m_wiener)):
                score = (x - (m[0] + m[1]) / 2) @ (m[1] - m[0])
                row.append(f"{name}: error {np.linalg.norm(m - m_exact):.3f}, holdout AUC {auc(score, y == 1):.3f}")
            print(f"{what} (σ = {sigma:.2f}), seed {seed}: " + "; ".join(row), flush=True)

if __name__ == "__main__":
    main()
