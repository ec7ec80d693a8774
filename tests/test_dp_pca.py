"""The DP-PCA floor (models/dp_pca.py): its privacy accounting, its release and its samples, on real images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from client.data import load_dataset
from fedsynth.config import DEFAULT_DATA
from models.dp_pca import (DPPCAGenerator, budget_shares, clip_rows, combine, exact_moments, fit_federated,
                           noise_multiplier, pooled_vectors, release_site, scaled_vector)

DELTA = 1e-5


@pytest.fixture(scope="module")
def data():
    """400 real training images of each class, first from the bundled PneumoniaMNIST."""
    ds = load_dataset(DEFAULT_DATA, "train")
    idx = np.sort(np.concatenate([np.flatnonzero(ds.labels == c)[:400] for c in (0, 1)]))
    return ds.images[idx], ds.labels[idx]


def analytic_delta(epsilon: float, sigma: float) -> float:
    """Balle & Wang 2018, Theorem 8: the exact δ(ε) of the Gaussian mechanism, sensitivity 1, noise σ."""
    return norm.cdf(0.5 / sigma - epsilon * sigma) - math.exp(epsilon) * norm.cdf(-0.5 / sigma - epsilon * sigma)


@pytest.mark.parametrize("epsilon,delta", [(1.0, 1e-5), (10.0, 1e-5), (3.0, 1e-6)])
def test_noise_matches_the_analytic_gaussian_mechanism(epsilon, delta):
    exact = brentq(lambda s: analytic_delta(epsilon, s) - delta, 1e-2, 100.0)
    sigma = noise_multiplier(epsilon, delta)
    # never less noise than the exact mechanism needs, and not much more (PRV is a numerical, tight account)
    assert exact <= sigma <= 1.02 * exact, (sigma, exact)
    assert analytic_delta(epsilon, sigma) <= delta
    # RDP is a looser bound: at least as much noise
    assert noise_multiplier(epsilon, delta, "rdp") >= exact


def test_adding_one_image_moves_the_release_by_at_most_its_sensitivity(data):
    images, labels = data
    rng = np.random.default_rng(0)
    base = images[:100].copy()
    base[:20] = rng.random(base[:20].shape)  # noise images and all-white images: far outside the clip ball
    base[20:25] = 1.0
    base_labels = labels[:100]
    for with_second in (False, True):
        x = pooled_vectors(base, 2)
        clip = 0.2 * math.sqrt(x.shape[1])
        before = scaled_vector(*exact_moments(clip_rows(x, clip), base_labels, 2, with_second), clip)
        moves = []
        for extra in [np.ones((1, 1, 28, 28)), np.zeros((1, 1, 28, 28)), rng.random((1, 1, 28, 28)),
                      images[500:501], np.full((1, 1, 28, 28), 0.5)]:
            for y in (0, 1):
                xs = pooled_vectors(np.concatenate([base, extra]), 2)
                after = scaled_vector(*exact_moments(clip_rows(xs, clip), np.r_[base_labels, y], 2, with_second),
                                      clip)
                moves.append(np.linalg.norm(after - before))
        assert max(moves) <= 1 + 1e-9, moves
        # the bound is nearly reached by an image on the clip sphere (≥ √(ρ_s + ρ_n + ρ_m/2))
        rho = budget_shares(with_second)
        assert max(moves) >= math.sqrt(rho["sums"] + rho["counts"] + rho["second-moments"] / 2) - 1e-9
        assert min(moves) > 0  # even a mid-grey image (x = 0 after centring) moves the count


def test_released_noise_has_the_calibrated_scale(data):
    """Noise measured in the sensitivity-1 space has std σ on every part (it would not if a scale were off)."""
    images, labels = data
    images, labels = images[:200], labels[:200]
    x = clip_rows(pooled_vectors(images, 2), 0.2 * 14)
    exact = exact_moments(x, labels, 2, True)
    sigma = noise_multiplier(1.0, DELTA)
    diffs = {"sums": [], "counts": [], "second-moments": [], "diagonal": []}
    iu = np.triu_indices(exact[0].shape[1])
    for seed in range(40):
        r = release_site(images, labels, 2, 1.0, DELTA, True, seed=seed)
        assert r.sites[0]["sigma"] == sigma and r.sites[0]["epsilon"] <= 1.0
        assert np.array_equal(r.second_moments, r.second_moments.transpose(0, 2, 1))  # Analyze Gauss: symmetric
        d = scaled_vector(r.sums, r.counts, r.second_moments, r.clip) - scaled_vector(*exact, r.clip)
        n_s, n_c = exact[0].size, exact[1].size
        diffs["sums"].append(d[:n_s]), diffs["counts"].append(d[n_s:n_s + n_c])
        if seed < 4:
            upper = d[n_s + n_c:].reshape(2, -1)
            diffs["second-moments"].append(upper[:, iu[0] != iu[1]].ravel())
            diffs["diagonal"].append(upper[:, iu[0] == iu[1]].ravel())
    for part, tol in (("sums", 0.04), ("counts", 0.25), ("second-moments", 0.02), ("diagonal", 0.07)):
        values = np.concatenate(diffs[part])
        assert abs(values.std() / sigma - 1) < tol, (part, values.std(), sigma)
        assert abs(values.mean()) < 4 * sigma / math.sqrt(len(values))


def test_huge_epsilon_recovers_the_class_means(data):
    images, labels = data
    model, release = fit_federated([(images[:300], labels[:300]), (images[300:], labels[300:])], 2, 100.0, DELTA,
                                   components=0)
    assert len(release.sites) == 2 and all(s["epsilon"] <= 100.0 for s in release.sites)
    pooled = images.reshape(len(images), 1, 14, 2, 14, 2).mean((3, 5)).reshape(len(images), -1)
    real = np.stack([pooled[labels == c].mean(0) for c in (0, 1)])
    released = model.mean.numpy()
    # the default clip (0.2·√d) shrinks bright images: use a clip no image can exceed to see the plain mean
    unclipped, _ = fit_federated([(images, labels)], 2, 100.0, DELTA, components=0, clip=0.5 * 14)
    assert np.abs(unclipped.mean.numpy() - real).max() < 0.03
    assert np.abs(real[0] - real[1]).max() > 0.1  # the classes differ by much more than the tolerance
    assert np.abs(released - real).max() < 0.1  # clipped, still close


def test_samples_shape_range_labels_and_determinism(data):
    images, labels = data
    sites = [(images[::2], labels[::2]), (images[1::2], labels[1::2])]
    model, _ = fit_federated(sites, 2, 10.0, DELTA, components=4, seed=3)
    again, _ = fit_federated(sites, 2, 10.0, DELTA, components=4, seed=3)
    other, _ = fit_federated(sites, 2, 10.0, DELTA, components=4, seed=4)
    for name, w in model.shared_weights().items():
        assert np.array_equal(w, again.shared_weights()[name])
    assert not np.array_equal(model.shared_weights()["mean"], other.shared_weights()["mean"])
    assert (model.variances[:, 0] > 0).all()  # at ε = 10 the top component survives the noise

    y = torch.arange(1000) % 2
    x = model.sample(1000, y, torch.Generator().manual_seed(0))
    assert x.shape == (1000, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, model.sample(1000, y, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, model.sample(1000, y, torch.Generator().manual_seed(1)))
    # each class's samples scatter around that class's mean image, not the other's
    means = torch.nn.functional.interpolate(model.mean.view(2, 1, 14, 14), scale_factor=2, mode="bilinear",
                                            align_corners=False)
    for c in (0, 1):
        avg = x[y == c].mean(0)
        assert (avg - means[c]).abs().mean() < (avg - means[1 - c]).abs().mean() / 2

    # the white-box MIA score: reconstruction error after projecting on the class's (orthonormal) components
    xs, ys = torch.as_tensor(images[:64]), torch.as_tensor(labels[:64])
    err = model.loss(xs, ys)
    centred = torch.as_tensor(pooled_vectors(images[:64], 2) + 0.5, dtype=torch.float32) - model.mean[ys]
    assert err.shape == (64,) and (err >= 0).all() and (err <= centred.pow(2).sum(1) + 1e-4).all()
    assert (err < centred.pow(2).sum(1) - 1e-3).float().mean() > 0.5  # the components explain something

    fresh = DPPCAGenerator(2, 1, 28, components=4)
    fresh.load_shared_weights(model.shared_weights())
    assert torch.equal(x, fresh.sample(1000, y, torch.Generator().manual_seed(0)))


def test_federated_sum_equals_the_pooled_release(data):
    images, labels = data
    a = release_site(images[:300], labels[:300], 2, math.inf, DELTA, True)
    b = release_site(images[300:], labels[300:], 2, math.inf, DELTA, True)
    pooled = release_site(images, labels, 2, math.inf, DELTA, True)
    total = combine([a, b])
    np.testing.assert_allclose(total.sums, pooled.sums, atol=1e-9)
    np.testing.assert_allclose(total.counts, [400, 400])
    np.testing.assert_allclose(total.second_moments, pooled.second_moments, atol=1e-8)
    noisy = [release_site(images[:300], labels[:300], 2, e, DELTA, True) for e in (1.0, 10.0)]
    both = combine(noisy)  # each site its own budget: the noise variances add
    assert both.noise_variance["sums"] == pytest.approx(sum(r.noise_variance["sums"] for r in noisy))
    assert [s["epsilon-target"] for s in both.sites] == [1.0, 10.0]
    with pytest.raises(ValueError, match="release 1 and release 0 disagree"):
        combine([a, release_site(images, labels, 2, math.inf, DELTA, False)])


def test_bad_input_is_refused_with_the_field_named(data):
    images, labels = data
    with pytest.raises(ValueError, match=r"hospital-a: pixel values must lie in \[0, 1\]"):
        release_site(images * 255, labels, 2, 1.0, DELTA, False, source="hospital-a")
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        release_site(images, labels + 1, 2, 1.0, DELTA, False)
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 1/N\)"):
        release_site(images[:10], labels[:10], 2, 1.0, 0.2, False)
    with pytest.raises(NotImplementedError, match="not trained with DP-SGD"):
        DPPCAGenerator().train_step(None, None, None, None)
