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
        torch.testing.assert_close(grad, their_grad, msg=name)
