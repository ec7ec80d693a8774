"""Skipping the weight gradients DP-SGD discards (privacy/input_grads.py) changes nothing that is clipped,
noised or accounted: the input gradients are autograd's own, the per-sample rows and the DP step are the same."""
import copy

import pytest
import torch
from torch import nn

from client.data import load_dataset
from client.trainer import dp_parts
from fedsynth.config import DEFAULT_DATA, RunConfig
from models import build_generator
from privacy.grad_samplers import PerSampleGradModule
from privacy.input_grads import input_grads_only


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=0, bias=False),
                                  dict(kernel_size=(3, 5), padding=(2, 1)), dict(kernel_size=1),
                                  dict(kernel_size=3, stride=2, padding=1),  # convolution_backward
                                  dict(kernel_size=3, padding=1, groups=2), dict(kernel_size=3, padding=3)])
def test_input_gradient_is_autograds_and_no_weight_gradient_is_left(conv):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, **conv), nn.SiLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, 4, 9, 11, requires_grad=True)
    net(x)  # materialise the lazy layer
    out = net(x)
    (expected,) = torch.autograd.grad(out.pow(2).sum(), x)
    with input_grads_only(net.parameters()):
        out_skip = net(x)
    torch.testing.assert_close(out_skip, out, rtol=0, atol=0)  # the forward is the same call
    out_skip.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_layers_outside_the_given_params_keep_their_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1))
    with input_grads_only(net[1].parameters()):
        net(torch.randn(2, 2, 5, 5)).sum().backward()
    assert net[0].weight.grad is not None and net[0].bias.grad is not None
    assert net[1].weight.grad is None and net[1].bias.grad is None


def test_with_the_hooks_off_weights_get_their_gradients():
    """The GAN's generator step runs through D with D's hooks off: an ordinary backward there."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(75, 1))
    module = PerSampleGradModule(net, batch_first=True, loss_reduction="mean")
    assert module.skip_discarded_grads
    module(torch.randn(4, 2, 5, 5)).mean().backward()
    assert all(p.grad is None for p in net.parameters()) and all(p.grad_sample is not None for p in net.parameters())
    module.zero_grad(set_to_none=True)
    module.disable_hooks()
    module(torch.randn(4, 2, 5, 5)).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_a_net_without_convolutions_keeps_autograds_path():
    assert not PerSampleGradModule(nn.Sequential(nn.Linear(3, 2)), batch_first=True).skip_discarded_grads


@pytest.mark.parametrize("family", ["gan", "diffusion"])
def test_the_dp_step_is_the_same_with_and_without_the_discarded_gradients(family):
    """Two copies of one model, one DP step each from the same seed (same batch, noise draws, K copies): the
    updated weights agree to float rounding and both accountants hold the same history."""
    data = load_dataset(DEFAULT_DATA, "train")
    x, y = torch.from_numpy(data.images[:24]), torch.from_numpy(data.labels[:24])
    torch.manual_seed(0)
    base = build_generator(family, **RunConfig(model=family).model_kwargs())
    results = []
    for skip in (True, False):
        model = copy.deepcopy(base)
        private, opt, acc = dp_parts(model, sigma=1.0, clip=0.5, sample_rate=0.3, expected_batch_size=24, lr=1e-2)
        assert private.skip_discarded_grads
        private.skip_discarded_grads = skip
        torch.manual_seed(1)
        model.train_step(private, opt, x, y, public=model.public_optimizer(1e-2))
        results.append(([p.detach().clone() for p in model.parameters()], acc.history))
    (skipped, h_skip), (kept, h_kept) = results
    assert h_skip == h_kept and len(h_skip) == 1
    moved = sum(float((a - b).abs().sum()) for a, b in zip(skipped, base.parameters()))
    assert moved > 0
    for a, b in zip(skipped, kept):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
