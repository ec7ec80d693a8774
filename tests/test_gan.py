"""GAN: only the discriminator is private; the generator step is post-processing and leaves no DP trace.

Real Opacus throughout (the trainer's own ``dp_parts``: GradSampleModule + DPOptimizer + accountant hook), and
one tiny federation through the real Flower engine with SecAgg+.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.data import load_dataset
from client.trainer import dp_parts
from fedsynth.config import DEFAULT_DATA
from models import build_generator
from privacy.grad_samplers import FACTORS, per_sample_rows
from server.checkpoint import load_weights

SIGMA, Q = 1.1, 0.1


@pytest.fixture(scope="module")
def batch():
    data = load_dataset(DEFAULT_DATA, "train")
    idx = np.random.default_rng(0).choice(len(data), 24, replace=False)
    return torch.from_numpy(data.images[idx]), torch.from_numpy(data.labels[idx])


def make_gan(n_critic=1, sigma=SIGMA, clip=1.0, expected_batch_size=24, diversity=0.0):
    torch.manual_seed(0)
    model = build_generator("gan", n_critic=n_critic, diversity=diversity)
    private, optimizer, acc = dp_parts(model, sigma=sigma, clip=clip, sample_rate=Q,
                                       expected_batch_size=expected_batch_size, lr=1e-3)
    model.train()
    return model, private, optimizer, acc, model.public_optimizer(1e-3)


def steps(acc) -> int:
    return sum(n for _, _, n in acc.history)


def d_params(model):
    return list(model.discriminator.parameters())


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("diversity", [0.0, 1.0])
def test_d_step_is_one_accountant_step_and_g_step_leaves_no_dp_state(batch, diversity):
    x, y = batch
    model, private, optimizer, acc, public = make_gan(diversity=diversity)
    model.d_step(private, optimizer, x, y)
    assert acc.history == [(SIGMA, Q, 1)]
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == len(x) for p in d_params(model))

    d_before, g_before = snapshot(model.discriminator), snapshot(model.generator)
    model.g_step(private, optimizer, public, n=len(x))
    assert acc.history == [(SIGMA, Q, 1)], "the generator step charged the accountant"
    for p in d_params(model):
        assert getattr(p, "grad_sample", None) is None, "stale per-sample gradients left in D"
        assert p.grad is None and getattr(p, "summed_grad", None) is None
        assert not hasattr(p, FACTORS), "stale factored per-sample rows left in D"
    assert all(torch.equal(a, b) for a, b in zip(d_before, snapshot(model.discriminator))), "G step moved D"
    assert any(not torch.equal(a, b) for a, b in zip(g_before, snapshot(model.generator))), "G did not move"
    assert private.hooks_enabled

    model.d_step(private, optimizer, x, y)  # the next D step works from a clean slate
    assert steps(acc) == 2 and all(p.grad_sample.shape[0] == len(x) for p in d_params(model))


def test_mode_seeking_term_spreads_the_generator_apart_for_one_label():
    """The diversity term does what it is for: with D held fixed, G steps with it raise the image distance
    between two noise draws of one label, where G steps without it (same D, same start, same draws) don't as
    much."""
    def spread_after(diversity: float) -> float:
        model, private, optimizer, acc, public = make_gan(diversity=diversity)
        for p in public.param_groups:
            p["lr"] = 1e-2
        torch.manual_seed(1)
        for _ in range(30):
            model.g_step(private, optimizer, public, n=64)
        assert acc.history == []  # G steps never charge the accountant
        g = torch.Generator().manual_seed(2)
        labels = torch.zeros(200, dtype=torch.long)
        with torch.no_grad():
            fake = model.generator(torch.randn(200, model.noise_dim, generator=g), labels)
        return float(fake.flatten(1).std(0).mean())

    assert spread_after(3.0) > 1.5 * spread_after(0.0)


def test_without_disabling_hooks_the_g_step_would_leave_per_sample_grads(batch):
    """Control for the test above: a G step straight through the wrapped D leaves per-sample gradients."""
    x, y = batch
    model, private, optimizer, acc, public = make_gan()
    optimizer.zero_grad(set_to_none=True)
    fake, fake_y = model.fake(len(x))
    F.softplus(-private(fake, fake_y)).mean().backward()
    assert all(p.grad_sample is not None for p in d_params(model))


@pytest.mark.parametrize("n_critic", [1, 3])
def test_train_step_counts_d_steps_and_updates_g_every_n_critic(batch, n_critic):
    x, y = batch
    model, private, optimizer, acc, public = make_gan(n_critic)
    g_moves = []
    for i in range(6):
        before = snapshot(model.generator)
        metrics = model.train_step(private, optimizer, x, y, public=public)
        assert steps(acc) == i + 1, "every train_step must be exactly one accountant step"
        g_moves.append(any(not torch.equal(a, b) for a, b in zip(before, snapshot(model.generator))))
        assert ("g_loss" in metrics) == g_moves[-1]
    assert g_moves == [(i + 1) % n_critic == 0 for i in range(6)]


def test_per_sample_row_i_is_real_image_i_plus_fake_i(batch):
    """Two forward passes, one backward: Opacus must pair each real image's gradient with its own fake's."""
    x, y = batch
    x, y = x[:3], y[:3]
    torch.manual_seed(0)
    reference = build_generator("gan")
    model = copy.deepcopy(reference)  # before Opacus hooks it
    private, optimizer, acc = dp_parts(model, sigma=0.0, clip=1e6, sample_rate=Q, expected_batch_size=3, lr=0.0)
    model.train()
    torch.manual_seed(3)
    model.d_step(private, optimizer, x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        fake, fake_y = reference.fake(len(x))  # the same fakes (same seed, same generator weights)
    D, x = reference.discriminator, reference.at_work_resolution(x)  # D sees real images at G's resolution
    for i in range(len(x)):
        D.zero_grad()
        (F.softplus(-D(x[i:i + 1], y[i:i + 1])) + F.softplus(D(fake[i:i + 1], fake_y[i:i + 1]))).sum().backward()
        for (name, p), q in zip(model.discriminator.named_parameters(), D.parameters()):
            torch.testing.assert_close(per_sample_rows(p)[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_one_image_moves_the_discriminator_by_at_most_c(batch):
    """Real image i and fake i share one per-sample row; a huge real image's row is clipped to C."""
    x, y = batch
    model, private, optimizer, acc, public = make_gan(sigma=0.0, clip=1.0, expected_batch_size=1)
    model.d_step(private, optimizer, x[:1] * 1e4, y[:1])
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in d_params(model)))
    assert 0.99 <= float(norm) <= 1.0 + 1e-4
    assert all(p.grad_sample.shape[0] == 1 for p in d_params(model))  # one row: real and fake together


def test_generator_step_uses_the_expected_batch_size_not_the_sampled_one(batch):
    """The Poisson batch size is a private count: the G step's fake batch is the public expected size."""
    x, y = batch
    model, private, optimizer, acc, public = make_gan(expected_batch_size=7)
    seen = []
    hook = model.generator.fc.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    model.train_step(private, optimizer, x, y, public=public)
    hook.remove()
    assert seen == [len(x), 7]  # D step: paired with the real batch; G step: the expected size


def test_weights_travel_as_one_prefixed_record():
    model = build_generator("gan")
    names = list(model.shared_weights())
    assert {n.split(".")[0] for n in names} == {"generator", "discriminator"}
    assert list(model.state_dict()) == names


def test_tiny_federation_with_secagg(run_tiny_family):
    run, run_dir, privacy = run_tiny_family("gan")
    for site in ("site-0", "site-1"):
        assert privacy[site]["steps"] == 2 and privacy[site]["sample-rate"] == run.sample_rate
    weights = load_weights(run_dir / "weights.safetensors")
    torch.manual_seed(run.seed)  # the server's initial model (FedSynthStrategy seeds it with run.seed)
    initial = build_generator("gan", **run.model_kwargs()).shared_weights()
    assert sorted(weights) == sorted(initial)
    moved = {k for k in weights if np.abs(weights[k] - initial[k]).max() > 1e-6}
    assert any(k.startswith("generator.") for k in moved) and any(k.startswith("discriminator.") for k in moved)


@pytest.mark.parametrize("c_in, c_out, h, w", [(32, 16, 7, 7), (3, 5, 4, 6), (1, 1, 1, 2)])
def test_fused_upsample_conv_is_upsample_then_conv(c_in, c_out, h, w):
    from models.gan import upsample_conv
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 3, 1, 1)
    x = torch.randn(3, c_in, h, w)
    torch.testing.assert_close(upsample_conv(x, conv), conv(torch.nn.Upsample(scale_factor=2)(x)),
                               atol=1e-5, rtol=1e-5)


def test_sampling_draws_the_images_of_the_plain_generator():
    """``sample`` runs the fused generator in chunks: the images are the unfused generator's, upsampled."""
    torch.manual_seed(0)
    model = build_generator("gan").eval()
    y = torch.arange(600) % 2
    got = model.sample(600, y, torch.Generator().manual_seed(3))
    z = torch.randn(600, model.noise_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = F.interpolate(model.generator(z, y), scale_factor=2, mode="bilinear", align_corners=False)
    assert got.shape == (600, 1, 28, 28) and got.min() >= 0 and got.max() <= 1
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
