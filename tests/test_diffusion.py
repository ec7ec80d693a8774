"""Diffusion: K noise draws of one image are one privacy unit, and the DP gradient is the right objective.

Real Opacus throughout (the trainer's own ``dp_parts`` and ``train_private``), and one tiny federation through
the real Flower engine with SecAgg+.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data import ImageDataset, load_dataset
from client.trainer import dp_parts, train_private
from fedsynth.config import DEFAULT_DATA
from models import build_generator
from privacy.grad_samplers import PerSampleGradModule
from privacy.rows import copies_per_row, rows_per_image
from opacus import GradSampleModule

K = 4
C_SMALL = 1e-4  # below every per-image gradient norm here: every row gets clipped


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    full = load_dataset(DEFAULT_DATA, "train")
    return full.subset(np.random.default_rng(0).choice(len(full), 60, replace=False))


def model_and_dp(sigma=0.0, clip=1.0, expected_batch_size=1, k=K, model=None):
    torch.manual_seed(0)
    model = model or build_generator("diffusion", noise_multiplicity=k, unet_width=8)
    private, optimizer, acc = dp_parts(model, sigma=sigma, clip=clip, sample_rate=0.1,
                                       expected_batch_size=expected_batch_size, lr=1e-3)
    return model.train(), private, optimizer, acc


def grad_norm(module) -> float:
    return float(torch.sqrt(sum(p.grad.pow(2).sum() for p in module.parameters())))


@pytest.mark.parametrize("n_images", [1, 3])
def test_k_copies_of_an_image_move_the_model_by_at_most_c(data, n_images):
    """Noise 0, expected batch 1: p.grad is the sum of the clipped per-image rows. C is far below any
    image's gradient norm (GroupNorm makes scaling the image up moot), so every row is clipped and the sum
    is at most n_images·C — not n_images·K·C as stock Opacus would give."""
    model, private, optimizer, acc = model_and_dp(clip=C_SMALL)
    x, y = torch.from_numpy(data.images[:n_images]) * 1e3, torch.from_numpy(data.labels[:n_images])
    model.train_step(private, optimizer, x, y)
    assert all(p.grad_sample.shape[0] == n_images for p in model.net.parameters())  # one row per image
    norm = grad_norm(model.net)
    assert norm <= n_images * C_SMALL * (1 + 1e-4)
    if n_images == 1:
        assert norm >= 0.99 * C_SMALL, "the image's row should be clipped to exactly C"
    assert acc.history == [(0.0, 0.1, 1)]


def test_control_without_averaging_one_image_would_count_k_times(data):
    """The same single huge image without the averaging: K clipped rows, sum well above C."""
    model, private, optimizer, acc = model_and_dp(clip=C_SMALL)
    x, y = torch.from_numpy(data.images[:1]) * 1e3, torch.from_numpy(data.labels[:1])
    optimizer.zero_grad(set_to_none=True)
    xt, t, labels, noise = model.corrupt(x, y, K)
    (private(xt, t, labels) - noise).pow(2).mean().backward()
    optimizer.step()
    assert all(p.grad_sample.shape[0] == K for p in model.net.parameters())
    assert grad_norm(model.net) > 1.5 * C_SMALL


@pytest.mark.parametrize("per_image_convs", [False, True])
def test_rows_are_each_images_mean_gradient_over_its_copies(data, per_image_convs):
    """Row i after averaging == the plain gradient of image i's mean loss over its own K copies: from Opacus'
    rows, and from fedsynth's Conv2d rule building each image's mean row directly (``copies_per_row``)."""
    torch.manual_seed(0)
    model = build_generator("diffusion", noise_multiplicity=K, unet_width=8).train()
    plain = copy.deepcopy(model.net)
    wrapper = PerSampleGradModule if per_image_convs else GradSampleModule
    private = wrapper(model.net, batch_first=True, loss_reduction="mean")
    x, y = torch.from_numpy(data.images[:3]), torch.from_numpy(data.labels[:3])
    xt, t, labels, noise = model.corrupt(x, y, K)
    with copies_per_row(private, K if per_image_convs else 1):
        (private(xt, t, labels) - noise).pow(2).mean().backward()
    if per_image_convs:  # the Conv2d rule really built per-image rows (before rows_per_image)
        convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.grad_sample.shape[0] == 3]
        assert len(convs) >= 3
    rows_per_image(private, K, 3)
    for i in range(3):
        rows = slice(i * K, (i + 1) * K)
        plain.zero_grad()
        (plain(xt[rows], t[rows], labels[rows]) - noise[rows]).pow(2).mean().backward()
        for (name, p), q in zip(model.net.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dp_gradient_without_noise_or_clipping_is_the_plain_mean_gradient(data):
    """Loss scaling: with σ = 0, no effective clipping and the expected batch = B images, the DP step's
    gradient equals the non-private gradient of the mean loss over all B·K rows (same noise draws)."""
    x, y = torch.from_numpy(data.images[:5]), torch.from_numpy(data.labels[:5])
    torch.manual_seed(0)
    model = build_generator("diffusion", noise_multiplicity=K, unet_width=8)
    plain_model = copy.deepcopy(model).train()  # before Opacus hooks the original
    model, private, optimizer, acc = model_and_dp(clip=1e6, expected_batch_size=5, model=model)
    torch.manual_seed(1)
    model.train_step(private, optimizer, x, y)
    plain_opt = plain_model.optimizer(plain_model.net.parameters(), 1e-3)
    torch.manual_seed(1)
    plain_model.train_step(plain_model.net, plain_opt, x, y)
    for p, q in zip(model.net.parameters(), plain_model.net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_accountant_counts_optimizer_steps_not_copies(data):
    model = build_generator("diffusion", noise_multiplicity=K, unet_width=8)
    result = train_private(model, data, sigma=1.3, clip=1.0, sample_rate=0.2, steps=3, lr=1e-3, seed=0)
    assert result.steps == 3 and result.history == [(1.3, 0.2, 3)]


def test_ema_is_post_processing_outside_the_private_module(data):
    model, private, optimizer, acc = model_and_dp(sigma=1.0)
    assert not any(p is e for p in model.private_module().parameters() for e in model.ema.parameters())
    assert {n.split(".")[0] for n in model.shared_weights()} == {"net", "ema"}
    ema_before = [e.detach().clone() for e in model.ema.parameters()]
    model.train_step(private, optimizer, torch.from_numpy(data.images[:4]), torch.from_numpy(data.labels[:4]))
    for before, e, p in zip(ema_before, model.ema.parameters(), model.net.parameters()):
        torch.testing.assert_close(e, before + (1 - model.ema_decay) * (p.detach() - before))
    assert acc.history == [(1.0, 0.1, 1)]


def test_ddim_sampler_is_deterministic_and_in_range():
    model = build_generator("diffusion", sampler_steps=3)
    labels = torch.tensor([0, 1, 1, 0])
    a = model.sample(4, labels, generator=torch.Generator().manual_seed(5))
    b = model.sample(4, labels, generator=torch.Generator().manual_seed(5))
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    c = model.sample(4, labels, generator=torch.Generator().manual_seed(5), steps=6)
    assert not torch.equal(a, c)


def test_tiny_federation_with_secagg(run_tiny_family):
    run, run_dir, privacy = run_tiny_family("diffusion")
    for site in ("site-0", "site-1"):
        assert privacy[site]["steps"] == 2  # optimizer steps, not K times as many


def zero_output_sample(skip: float, eta: float, steps: int, n: int = 200) -> torch.Tensor:
    """Samples (in [-1, 1], at the UNet's side) of a diffusion model whose net outputs only its class image,
    set to 0: the best x0-predictor for data N(0, skip² I) when ``skip`` > 0, the data's mean alone otherwise."""
    model = build_generator("diffusion", skip=skip, eta=eta, guidance=1.0)
    with torch.no_grad():
        for net in (model.net, model.ema):
            net.out[-1].weight.zero_(), net.out[-1].bias.zero_(), net.class_image.weight.zero_()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 14, 14, generator=g)
        fresh = torch.randn(steps, n, 1, 14, 14, generator=g)
        return model._ddim(x, torch.zeros(n, dtype=torch.long), steps, fresh) * 2 - 1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_skip_keeps_the_spread_a_mean_only_net_loses(eta):
    """Why ``skip`` exists: a net that has learned nothing beyond the class image (what DP noise leaves)
    collapses every sample onto that image without it; with it the sampler draws from a Gaussian of spread
    σ_data around the image (DDIM with the Gaussian's exact denoiser: the spread is exact up to the
    discretization, within 10% at 50 steps)."""
    assert float(zero_output_sample(0.0, eta, steps=10).std()) < 1e-3
    sigma = 0.3
    spread = float(zero_output_sample(sigma, eta, steps=50).std())
    assert abs(spread / sigma - 1) < 0.1, spread


def test_skip_needs_x0_prediction():
    with pytest.raises(ValueError, match="skip"):
        build_generator("diffusion", skip=0.5, prediction="eps")


def test_a_training_round_hands_its_freed_memory_back():
    """A site's process trains round after round (the Simulation Engine keeps it): what a round's per-sample
    buffers freed must go back to the OS when the trainer returns, or RSS climbs by ≈ 0.8 GB a round here
    (glibc keeps the pages; three diffusion simulations side by side once ran out of memory)."""
    def rss_gb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9

    data = load_dataset(DEFAULT_DATA, "train").subset(np.arange(2000))
    model = build_generator("diffusion")
    before = rss_gb()
    train_private(model, data, sigma=4.6, clip=1.0, sample_rate=0.3, steps=2, lr=1e-3, seed=0)
    assert rss_gb() - before < 0.25, f"the round kept {rss_gb() - before:.2f} GB"
