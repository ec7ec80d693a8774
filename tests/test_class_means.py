"""The class-mean release of round 0 (privacy/class_means.py): its sensitivity, its noise, what it costs in a
site's plan and ledger, how each family takes it, and a real SecAgg+ federation that runs it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant

from client.client_app import SiteClient, hash_name
from client.data import load_dataset
from client.site import RoundRefused, Site, SiteConfig
from fedsynth.config import DEFAULT_DATA
from models import build_generator
from privacy.audit import audit
from privacy.class_means import (COUNT_SHARE, default_clip, from_wire, means_of, noise_multiplier,
                                 release, wire_length)
from privacy.ledger import Ledger, weights_sha256
from privacy.policy import SitePolicy
from server.checkpoint import load_weights
from simulations.runner import prepare_sites

DELTA = 1e-5


@pytest.fixture(scope="module")
def data():
    ds = load_dataset(DEFAULT_DATA, "train")
    idx = np.sort(np.concatenate([np.flatnonzero(ds.labels == c)[:150] for c in (0, 1)]))
    return ds.images[idx], ds.labels[idx]


def scaled(r, clip: float) -> np.ndarray:
    """The release in the space where the mechanism has sensitivity 1: (a·sums, b·counts)."""
    return np.concatenate([math.sqrt(1 - COUNT_SHARE) / clip * r.sums.ravel(), math.sqrt(COUNT_SHARE) * r.counts])


def test_one_image_or_one_whole_patient_moves_the_release_by_at_most_one(data):
    images, labels = data
    rng = np.random.default_rng(0)
    base, base_y = images[:120].copy(), labels[:120]
    base[:10] = rng.random(base[:10].shape)  # far outside the clip ball
    base[10:15] = 1.0
    clip = default_clip(196)
    moves = {"image": [], "patient": []}
    before = scaled(release(base, base_y, 2, 0.0, 2), clip)
    for extra in [np.ones((1, 1, 28, 28)), np.zeros((1, 1, 28, 28)), rng.random((1, 1, 28, 28)), images[200:201]]:
        for y in (0, 1):
            after = scaled(release(np.concatenate([base, extra]), np.r_[base_y, y], 2, 0.0, 2), clip)
            moves["image"].append(np.linalg.norm(after - before))
    # patients: 30 patients of 4 images each; one more patient with 12 white or noise images of both classes
    ids = np.repeat(np.arange(30), 4)
    before = scaled(release(base, base_y, 2, 0.0, 2, units=ids), clip)
    for extra in [np.ones((12, 1, 28, 28)), rng.random((12, 1, 28, 28)), images[200:212]]:
        for ys in (np.zeros(12, int), np.ones(12, int), np.arange(12) % 2):
            after = scaled(release(np.concatenate([base, extra]), np.r_[base_y, ys], 2, 0.0, 2,
                                   units=np.r_[ids, np.full(12, 99)]), clip)
            moves["patient"].append(np.linalg.norm(after - before))
    assert max(moves["image"]) <= 1 + 1e-9 and max(moves["patient"]) <= 1 + 1e-9, moves
    assert max(moves["image"]) >= 0.99 and max(moves["patient"]) >= 0.99  # the bound is (nearly) reached
    # without the per-patient scaling a 12-image patient would move it by far more than 1
    unscaled = scaled(release(np.concatenate([base, np.ones((12, 1, 28, 28))]), np.r_[base_y, np.zeros(12, int)],
                              2, 0.0, 2), clip) - scaled(release(base, base_y, 2, 0.0, 2), clip)
    assert np.linalg.norm(unscaled) > 5


def test_noise_has_the_calibrated_scale(data):
    images, labels = data
    sigma = noise_multiplier(1.0, DELTA)
    exact = release(images, labels, 2, 0.0, 2)
    d_sums, d_counts = [], []
    for seed in range(60):
        r = release(images, labels, 2, sigma, 2, rng=np.random.default_rng(seed))
        d_sums.append((r.sums - exact.sums).ravel()), d_counts.append(r.counts - exact.counts)
    clip = default_clip(196)
    assert np.std(d_sums) == pytest.approx(sigma * clip / math.sqrt(1 - COUNT_SHARE), rel=0.03)
    assert np.std(d_counts) == pytest.approx(sigma / math.sqrt(COUNT_SHARE), rel=0.2)
    # one step at q = 1 in Opacus' own PRV accountant: the release alone costs ε = 1
    prv = PRVAccountant()
    prv.history = [(sigma, 1.0, 1)]
    assert 0.97 <= prv.get_epsilon(delta=DELTA) <= 1.0 + 1e-6


def test_exact_release_gives_the_class_means_and_survives_the_wire(data):
    images, labels = data
    pooled = images.reshape(len(images), 1, 14, 2, 14, 2).mean((3, 5)).reshape(len(images), -1)
    real = np.stack([pooled[labels == c].mean(0) for c in (0, 1)])
    wide = release(images, labels, 2, 0.0, 2, clip=7.0)  # a clip no image reaches: the plain means
    np.testing.assert_allclose(wide.means(), real, atol=1e-6)  # the images are float32
    assert np.abs(real[0] - real[1]).max() > 0.1
    # two sites' wire vectors, summed as the server sums them, give the pooled sums and counts
    a, b = release(images[::2], labels[::2], 2, 0.0, 2), release(images[1::2], labels[1::2], 2, 0.0, 2)
    sums, counts = from_wire(a.to_wire().astype(np.float64) + b.to_wire(), 2, 196)
    pooled_release = release(images, labels, 2, 0.0, 2)
    np.testing.assert_allclose(counts, pooled_release.counts, atol=1e-3)
    np.testing.assert_allclose(means_of(sums, counts), pooled_release.means(), atol=1e-5)
    assert a.to_wire().shape == (wire_length(2, 196),) and a.to_wire().dtype == np.float32
    with pytest.raises(ValueError, match="expected 394 values"):
        from_wire(np.zeros(10), 2, 196)
    with pytest.raises(ValueError, match=r"hospital-a: pixel values must lie in \[0, 1\]"):
        release(images * 255, labels, 2, 1.0, 2, source="hospital-a")


@pytest.fixture
def site(make_run):
    def make(share: float, policy: SitePolicy | None = None, **changes):
        run = make_run(f"cm-site-{share}", class_mean_share=share, **changes)
        prepare_sites(run)
        config = SiteConfig.from_node_config({"partition-id": 0}, run)
        if policy is not None:
            config = SiteConfig(config.name, config.data_path, config.ledger_path, policy)
        return run, Site(config, run.resolution, run.num_classes)
    return make


def test_the_plan_pays_for_the_release_out_of_the_same_budget(site):
    run, s = site(0.25)
    plan = s.plan(run)
    release_sigma = plan["class_means"]["sigma"]
    total = plan["rounds"] * plan["steps_per_round"]
    prv = PRVAccountant()  # Opacus' own accountant on the plan's mechanisms, not fedsynth's wrapper
    prv.history = [(release_sigma, 1.0, 1)]
    alone = prv.get_epsilon(delta=run.delta)
    assert 0.97 * 0.25 * run.epsilon <= alone <= 0.25 * run.epsilon + 1e-6  # the release: its share of ε
    prv.history = [(release_sigma, 1.0, 1), (plan["sigma"], plan["sample_rate"], total)]
    assert run.epsilon - 0.02 <= prv.get_epsilon(delta=run.delta) <= run.epsilon + 1e-6  # everything: the budget
    other_run, other = site(0.0)
    assert other.plan(other_run)["class_means"] is None and other.plan(other_run)["sigma"] < plan["sigma"]


def test_round_zero_is_charged_once_replayed_and_refused_without_a_plan_for_it(site):
    run, s = site(0.2)
    zeros = [np.zeros(wire_length(2, 196), np.float32)]
    config = {**run.to_flower(), "server-round": 0, "secagg-clipping-range": 8.0}
    client = SiteClient({"partition-id": 0})
    sent, weight, metrics = client.fit(zeros, config)
    assert weight == 1 and metrics["names-sha256"] and metrics["steps"] == 0
    assert [a.shape for a in sent] == [(394,)] and sent[0].dtype == np.float32
    (charge,) = Ledger(s.config.ledger_path).charges()
    plan = Ledger(s.config.ledger_path).plan(run.run_id)
    assert (charge["round"], charge["released"], charge["sample_rate"], charge["steps"]) == (0, "class-means", 1.0, 1)
    assert charge["sigma"] == plan["class_means"]["sigma"] and charge["weights_sha256"] == weights_sha256(sent)
    # the vector is the site's own noisy release: its counts are near the site's class counts
    _, counts = from_wire(sent[0], 2, 196)
    assert np.abs(counts - np.bincount(s.train.labels, minlength=2)).max() < 8 * charge["sigma"] / math.sqrt(0.05)
    again, _, m2 = client.fit(zeros, config)  # the server asks again after a restart: the same vector, no charge
    assert np.array_equal(again[0], sent[0]) and m2["replayed"] is True
    assert len(Ledger(s.config.ledger_path).charges()) == 1
    assert audit(s.config.ledger_path)["ok"]
    run0, _ = site(0.0, rounds=3)
    with pytest.raises(RoundRefused, match="round 0 .* is not in the plan"):
        SiteClient({"partition-id": 0}).fit(zeros, {**run0.to_flower(), "server-round": 0})


def test_a_min_sigma_rule_covers_the_release_too(site):
    run, s = site(0.9, SitePolicy(min_sigma=2.0))  # 90% of ε on the release: its σ is the small one
    with pytest.raises(RoundRefused, match="min-sigma=2"):
        s.plan(run)


@pytest.mark.parametrize("family", ["vae", "gan", "diffusion"])
def test_each_family_starts_its_classes_from_the_means(family, data):
    images, labels = data
    means = torch.as_tensor(release(images, labels, 2, 0.0, 2).means(), dtype=torch.float32).view(2, 1, 14, 14)
    torch.manual_seed(0)
    model = build_generator(family, coarse=2, latent_dim=4)
    model.set_class_means(means)
    if family == "vae":  # z = 0 decodes to exactly the class mean's logits (bilinearly upsampled, as always)
        for c in (0, 1):
            m = means[c:c + 1].clamp(0.01, 0.99)
            target = torch.nn.functional.interpolate(torch.log(m / (1 - m)), scale_factor=2, mode="bilinear",
                                                     align_corners=False)
            torch.testing.assert_close(model.decode_logits(torch.zeros(1, 4), torch.tensor([c])), target,
                                       atol=1e-4, rtol=0)
    if family == "diffusion":
        w = model.ema.class_image.weight
        torch.testing.assert_close(w[:2], means.flatten(1) * 2 - 1)
        torch.testing.assert_close(w[2], (means.flatten(1) * 2 - 1).mean(0))
    y = torch.arange(400) % 2
    x = torch.nn.functional.avg_pool2d(model.sample(400, y, torch.Generator().manual_seed(0)), 2)
    for c in (0, 1):  # an untrained model's samples of class c sit nearer mean c than the other class's mean
        avg = x[y == c].mean(0)
        assert (avg - means[c]).abs().mean() < (avg - means[1 - c]).abs().mean(), family
    with pytest.raises(ValueError, match=r"class means must be shaped \(2, 1, 14, 14\)"):
        model.set_class_means(torch.zeros(2, 1, 28, 28))


def test_secure_federation_sets_the_summed_release_as_the_prior(secure_reference_run):
    """Round 0 through the real Simulation Engine with SecAgg+ (2 sites, then 2 rounds): each ledger holds one
    release (q = 1, one step) that the audit recomputes; the global model round 1 starts from holds the means of
    the sum of the two sites' releases (recomputed here from each site's data and its ledger's σ)."""
    run, run_dir = secure_reference_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    round0 = metrics["rounds"][0]
    assert (round0["round"], round0["phase"], round0["sites"]) == (0, "class-means", ["site-0", "site-1"])
    sums, counts = np.zeros((2, 196)), np.zeros(2)
    for name in ("site-0", "site-1"):
        ledger = Ledger(Path(run.state_dir) / name / "ledger.jsonl")
        charges = ledger.charges()
        assert [(c["round"], c["released"]) for c in charges] == [(0, "class-means"), (1, "weights"),
                                                                   (2, "weights")]
        train = load_dataset(Path(run.state_dir) / name / "data.npz", "train")
        r = release(train.images, train.labels, 2, charges[0]["sigma"], 2,
                    rng=np.random.default_rng(run.seed * 100_003 + hash_name(name)))
        sums, counts = sums + r.sums, counts + r.counts
        site_audit = audit(ledger.path)["sites"][0]
        assert site_audit["ok"] and site_audit["totals"]["epsilon_prv"] <= run.epsilon + 1e-6
        assert site_audit["totals"]["epsilon_prv"] > epsilon_without_release(charges, run.delta)
    prior = load_weights(run_dir / "checkpoints" / "round-000.safetensors")["linear_decoder.weight"][:, 4:]
    expected = np.clip(means_of(sums, counts), 0.01, 0.99)
    np.testing.assert_allclose(1 / (1 + np.exp(-prior.T)), expected, atol=1e-3)  # SecAgg+ quantization only
    assert "class means: released once before round 1 by site-0, site-1" in (run_dir / "summary.txt").read_text()
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["site-0"]["rounds"] == 2 and privacy["site-0"]["class-mean-releases"] == 1


def epsilon_without_release(charges, delta) -> float:
    prv = PRVAccountant()
    prv.history = [(c["sigma"], c["sample_rate"], c["steps"]) for c in charges if c["round"] != 0]
    return prv.get_epsilon(delta=delta)


def test_wiener_filter_of_the_prior_benchmark_keeps_a_clean_image_and_removes_white_noise():
    """simulations/bench_prior_noise.py: with no noise the filter is the identity; on a smooth image plus white
    noise of the stated variance it brings the image closer to the clean one."""
    from simulations.bench_prior_noise import wiener

    yy, xx = np.mgrid[0:14, 0:14] / 13.0
    clean = np.stack([0.3 + 0.4 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.4) ** 2) / 0.1), 0.5 + 0.2 * xx])
    np.testing.assert_allclose(wiener(clean, np.zeros(2)), clean, atol=1e-9)
    rng = np.random.default_rng(0)
    var = np.array([0.05 ** 2, 0.08 ** 2])
    noisy = clean + rng.normal(size=clean.shape) * np.sqrt(var)[:, None, None]
    assert np.linalg.norm(wiener(noisy, var) - clean) < 0.7 * np.linalg.norm(noisy - clean)
