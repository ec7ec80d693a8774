"""Backward passes that skip the weight gradients DP-SGD throws away.

In a private step autograd computes, for every Conv2d and Linear layer, the gradient of the batch loss with
respect to the layer's input (needed to reach the layers below) and with respect to its weight and bias. DP-SGD
never uses the latter: the per-sample rows come from Opacus' hooks (the layer's input and output gradient), and
``DPOptimizer.add_noise`` overwrites ``p.grad`` with the clipped, noised sum of those rows. For the diffusion
UNet those discarded weight gradients were a third of the ordinary backward.

``input_grads_only(params)`` is a torch-function mode: inside it, every ``F.conv2d`` / ``F.linear`` whose weight
is one of ``params`` runs as an autograd function whose backward returns the input's gradient and nothing for
the weight and bias (their ``.grad`` stays None). The forward is the same call, the output gradients the hooks
see are the same tensors, so the rows, their norms, clip factors, noise and the accountant's inputs do not
change (tests/test_input_grads.py). Stride-1 convolutions take the input's gradient as the forward convolution
of the output gradient with the flipped kernel, which oneDNN runs 1–10x faster on these layers than
``convolution_backward`` (the same sums in a different order: equal to float rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv2d_input_grad(g, x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """The gradient of conv2d(x, weight) with respect to x, given the output gradient g (pairs of ints)."""
    (kh, kw) = weight.shape[2:]
    if stride == (1, 1) and dilation == (1, 1) and groups == 1 and padding[0] < kh and padding[1] < kw:
        return F.conv2d(g, weight.flip(2, 3).transpose(0, 1), None, 1, (kh - 1 - padding[0], kw - 1 - padding[1]))
    return torch.ops.aten.convolution_backward(g, x, weight, None, list(stride), list(padding), list(dilation),
                                               False, [0, 0], groups, [True, False, False])[0]


class _Conv2dInputGradOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (_pair(stride), _pair(padding), _pair(dilation), groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:  # e.g. the first layer, on the data: nothing to compute
            return (None,) * 7
        x, weight = ctx.saved_tensors
        return conv2d_input_grad(g, x, weight, *ctx.conf), None, None, None, None, None, None


class _LinearInputGradOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        return (g.matmul(weight) if ctx.needs_input_grad[0] else None), None, None


def _bound(names, args, kwargs, defaults):
    bound = dict(zip(names, args), **kwargs)
    return [bound.get(n, defaults.get(n)) for n in names]


class input_grads_only(TorchFunctionMode):
    """Within the block, conv2d / linear calls on one of ``params`` (a weight, with its bias in ``params`` or
    absent) leave no gradient on them; everything else runs as usual."""

    def __init__(self, params):
        super().__init__()
        self.ids = {id(p) for p in params}

    def _ours(self, weight, bias) -> bool:
        return id(weight) in self.ids and (bias is None or id(bias) in self.ids)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _bound(_CONV_ARGS, args, kwargs, _CONV_DEFAULTS)
            if self._ours(weight, bias) and not isinstance(padding, str) and x.dim() == 4:
                return _Conv2dInputGradOnly.apply(x, weight, bias, stride, padding, dilation, groups)
        elif func is F.linear:
            x, weight, bias = _bound(("input", "weight", "bias"), args, kwargs, {"bias": None})
            if self._ours(weight, bias):
                return _LinearInputGradOnly.apply(x, weight, bias)
        return func(*args, **kwargs)
