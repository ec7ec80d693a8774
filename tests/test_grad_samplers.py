"""The faster Conv2d per-sample-gradient rule gives Opacus' own rows, so DP-SGD clips, sums and noises the
same numbers (privacy/grad_samplers.py)."""
import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from privacy.grad_samplers import PerSampleGradModule


def per_sample_grads(wrapper, net, x):
    module = wrapper(copy.deepcopy(net), batch_first=True, loss_reduction="mean")
    module(x).pow(2).mean().backward()
    return {name: p.grad_sample.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=0, bias=False),
                                  dict(kernel_size=(3, 5), padding=(1, 2)), dict(kernel_size=1), dict(kernel_size=1, padding=1),
                                  dict(kernel_size=3, stride=2, padding=1),  # falls back to Opacus' rule
                                  dict(kernel_size=3, padding=1, groups=2)])  # same
def test_conv_rows_equal_opacus_rows(conv):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(36, 6, **conv), nn.SiLU(), nn.Conv2d(6, 2, 3, padding=1))  # 36: both rules
    x = torch.randn(7, 36, 9, 11)
    ours = per_sample_grads(PerSampleGradModule, net, x)
    theirs = per_sample_grads(GradSampleModule, net, x)
    assert ours.keys() == theirs.keys() and len(ours) >= 3
    for name in ours:
        assert ours[name].shape == theirs[name].shape == (7, *dict(net.named_parameters())[name.removeprefix("_module.")].shape)
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    # and they are per-sample: row i is the gradient of sample i's loss alone (times 1/B·B = 1 under "mean")
    net(x[2:3]).pow(2).mean().backward()
    first = next(p for p in net.parameters())
    torch.testing.assert_close(ours["_module.0.weight"][2], first.grad, rtol=1e-4, atol=1e-5)


def test_empty_batch_gives_empty_rows():
    net = nn.Conv2d(1, 3, 3, padding=1)
    module = PerSampleGradModule(net, batch_first=True, loss_reduction="sum")
    module(torch.zeros(0, 1, 5, 5)).sum().backward()
    assert net.weight.grad_sample.shape[1:] == net.weight.shape
    assert float(net.weight.grad_sample.abs().sum()) == 0.0


def test_opacus_global_table_is_untouched():
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is not PerSampleGradModule.GRAD_SAMPLERS[nn.Conv2d]


def test_the_shifted_rule_is_the_one_exercised_above():
    from privacy.grad_samplers import _shifted_matmul_applies
    assert _shifted_matmul_applies(nn.Conv2d(36, 6, 3, padding=1), 7)
    assert _shifted_matmul_applies(nn.Conv2d(6, 2, 3, padding=1), 7)
    assert not _shifted_matmul_applies(nn.Conv2d(36, 6, 3, stride=2), 7)
    assert not _shifted_matmul_applies(nn.Conv2d(1, 8, 3), 7)  # too thin: Opacus' unfold is faster


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rows_handed_over_equal_opacus_rows_also_when_two_passes_accumulate(reduction):
    """Two forward passes through the same layers before one backward (the GAN's D(real) and D(fake)): Opacus
    sums the passes' rows; handing the first pass's rows over must not change that, nor alias autograd's."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 5), nn.SiLU(), nn.Linear(5, 1))
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    rows = {}
    for wrapper in (PerSampleGradModule, GradSampleModule):
        module = wrapper(copy.deepcopy(net), batch_first=True, loss_reduction=reduction)
        loss = (module(a) - module(b)).pow(2)
        (loss.mean() if reduction == "mean" else loss.sum()).backward()
        rows[wrapper] = {n: (p.grad_sample.clone(), p.grad.clone()) for n, p in module.named_parameters()}
    for name, (ours, grad) in rows[PerSampleGradModule].items():
        theirs, their_grad = rows[GradSampleModule][name]
        torch.testing.assert_close(ours, theirs, msg=name)
        torch.testing.assert_close(grad, their_grad, msg=name)  # Linear only: autograd's path is kept


def _dp_step(module_cls, optimizer_cls, net, passes, clip, sigma, seed=3):
    """One DP-SGD step (SGD, lr 1) of a copy of ``net``: its noised, clipped gradients, rows, net, optimizer."""
    net = copy.deepcopy(net)
    module = module_cls(net, batch_first=True, loss_reduction="mean")
    opt = optimizer_cls(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                        expected_batch_size=len(passes[0]), loss_reduction="mean")
    opt.zero_grad()
    sum(module(x).pow(2).sum(1).mean() * (k + 1) for k, x in enumerate(passes)).backward()
    rows = {n: p.grad_sample for n, p in net.named_parameters()}
    torch.manual_seed(seed)  # the same noise draws for both optimizers
    assert opt.pre_step()
    return {n: p.grad.clone() for n, p in net.named_parameters()}, rows, net, opt


@pytest.mark.parametrize("passes", [1, 2])  # 2: D(real) and D(fake) before one backward, as the GAN's D step
@pytest.mark.parametrize("clip,sigma", [(1e3, 0.0), (0.05, 0.0), (0.05, 1.0)])
def test_factored_linear_rows_give_opacus_step(passes, clip, sigma):
    """Norms and clipped sum from the factors: the same noised gradient as Opacus' GradSampleModule +
    DPOptimizer, clipping inactive (large C), active (small C), and with noise."""
    from opacus.optimizers import DPOptimizer

    from privacy.grad_samplers import FACTORS, FactoredDPOptimizer, FactoredRowsModule, per_sample_rows
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 12), nn.SiLU(), nn.Linear(12, 3))
    xs = [torch.randn(9, 40) for _ in range(passes)]
    ours, our_rows, our_net, our_opt = _dp_step(FactoredRowsModule, FactoredDPOptimizer, net, xs, clip, sigma)
    theirs, their_rows, _, _ = _dp_step(GradSampleModule, DPOptimizer, net, xs, clip, sigma)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    # the factored path was the one taken: the weights' stored rows are the NaN placeholder, the biases real
    assert torch.isnan(our_rows["0.weight"]).all() and our_rows["0.weight"].shape == their_rows["0.weight"].shape
    torch.testing.assert_close(our_rows["0.bias"], their_rows["0.bias"])
    torch.testing.assert_close(per_sample_rows(dict(our_net.named_parameters())["0.weight"]), their_rows["0.weight"])
    assert all(hasattr(p, FACTORS) for p in (our_net[0].weight, our_net[2].weight))
    our_opt.zero_grad()  # like Opacus' grad_sample, the factors last until zero_grad
    assert not any(hasattr(p, FACTORS) for p in our_net.parameters())
    if clip < 1:  # the test really clips: some sample's norm exceeds C
        norms = torch.stack([g.reshape(9, -1).norm(dim=1) for g in their_rows.values()], 1).norm(dim=1)
        assert (norms > clip).any()


def test_factored_module_falls_back_to_real_rows_on_sequence_inputs():
    """A Linear layer on [n, T, in] inputs: b_i a_iᵀ summed over T is no single outer product, so real rows."""
    from privacy.grad_samplers import FactoredRowsModule
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    x = torch.randn(5, 7, 6)
    rows = {}
    for wrapper in (FactoredRowsModule, GradSampleModule):
        module = wrapper(copy.deepcopy(net), batch_first=True, loss_reduction="mean")
        module(x).pow(2).mean().backward()
        rows[wrapper] = {n: p.grad_sample for n, p in module.named_parameters()}
    for name, gs in rows[FactoredRowsModule].items():
        torch.testing.assert_close(gs, rows[GradSampleModule][name], msg=name)


def test_a_second_backward_without_a_step_is_refused():
    from privacy.grad_samplers import FactoredRowsModule
    net = nn.Linear(6, 2)
    module = FactoredRowsModule(net, batch_first=True, loss_reduction="mean")
    module(torch.randn(4, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="still held"):
        module(torch.randn(4, 6)).sum().backward()


def test_models_that_regroup_rows_get_real_rows():
    """The diffusion model averages its K copies' rows itself: its trainer must not hand it placeholders."""
    from client.trainer import dp_parts
    from models import build_generator
    from privacy.grad_samplers import FactoredRowsModule
    kinds = {}
    for family in ("vae", "gan", "diffusion"):
        model = build_generator(family)
        private, _, _ = dp_parts(model, sigma=1.0, clip=1.0, sample_rate=0.1, expected_batch_size=8, lr=1e-3)
        kinds[family] = isinstance(private, FactoredRowsModule)
    assert kinds == {"vae": True, "gan": True, "diffusion": False}


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), padding=(1, 2)),
                                  dict(kernel_size=3, padding=0, bias=False), dict(kernel_size=1, padding=1)])
@pytest.mark.parametrize("k", [2, 3])
def test_per_image_conv_rows_are_the_mean_of_opacus_rows_over_copies(conv, k):
    """Inside ``copies_per_row(module, K)``: row i = mean of Opacus' rows i·K … i·K+K−1, odd sizes too."""
    from privacy.rows import copies_per_row, rows_per_image
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(36, 6, **conv), nn.SiLU(), nn.Conv2d(6, 2, 3, padding=1))
    x = torch.randn(4 * k, 36, 9, 11)
    module = PerSampleGradModule(copy.deepcopy(net), batch_first=True, loss_reduction="mean")
    with copies_per_row(module, k):
        module(x).pow(2).mean().backward()
    assert module._module[0].weight.grad_sample.shape[0] == 4  # built per image, not per copy
    rows_per_image(module, k, 4)  # the thin second layer used Opacus' rule: averaged here
    theirs = per_sample_grads(GradSampleModule, net, x)
    for name, p in module.named_parameters():
        expected = theirs[name].view(4, k, *theirs[name].shape[1:]).mean(1)
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(hasattr(m, "unit_copies") for m in module._module.modules())  # the mark is gone
