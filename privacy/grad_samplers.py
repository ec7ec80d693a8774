"""Per-sample gradients as Opacus computes them, with a faster Conv2d rule: ``PerSampleGradModule``.

Opacus' Conv2d rule unfolds each input (im2col: a copy kh·kw times the activations) and contracts it with
the output gradients in one batched matmul. On a CPU that copy is most of DP-SGD's overhead for small conv
nets (the diffusion UNet: ~60% of the private step). For a stride-1 convolution the same sums need no copy:

    dW[n, o, c, i, j] = Σ_{h,w} g[n, o, h, w] · x_pad[n, c, h + i, w + j]

Flatten the padded input row-major and lay g out on the padded width (zeros in the kw − 1 extra columns):
the window for offset (i, j) is then the contiguous slice starting at i·W_pad + j, so each of the kh·kw
offsets is one batched matmul on a strided view of the same memory. Only the order of the arithmetic
changes: what is clipped, summed and noised (and the accountant's inputs) is identical;
tests/test_grad_samplers.py checks the rows against Opacus' own rule. Layers this rule does not help
(strides, dilation, groups, non-zero padding modes, empty batches, very few input channels) use Opacus'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn


def _shifted_matmul_applies(layer: nn.Conv2d, n: int) -> bool:
    c_in, (kh, kw) = layer.in_channels, layer.kernel_size
    return (n > 0 and layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1)
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and c_in * kh * kw >= 32)  # below that a matmul per offset is too thin to beat one unfold


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if not _shifted_matmul_applies(layer, n):
        return compute_conv_grad_sample(layer, activations, backprops)
    c_in, c_out = x.shape[1], backprops.shape[1]
    (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
    h_out, w_out = backprops.shape[2:]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        # one extra zero row at the bottom keeps the last offset's slice inside the buffer
        flat = F.pad(x, (pw, pw, ph, ph + 1)).reshape(n, c_in, -1)
        w_pad = x.shape[3] + 2 * pw
        g = F.pad(backprops, (0, w_pad - w_out)).reshape(n, c_out, h_out * w_pad)
        dw = x.new_empty(n, c_out, c_in, kh, kw)
        for i in range(kh):
            for j in range(kw):
                start = i * w_pad + j
                dw[..., i, j] = torch.bmm(g, flat[..., start:start + h_out * w_pad].transpose(1, 2))
        out[layer.weight] = dw
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def handed_over(sampler):
    """Opacus stores a layer's rows by allocating zeros of the longest batch seen and copying them in (so
    rows of several backward passes can be summed). When nothing is accumulated yet and the rows already
    have that length, the copy is the same tensor: hand the rows over instead (for the VAE's 786-input
    layer, the zero fill and the copy were a third of DP-SGD's overhead)."""
    def rows(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor):
        out = sampler(layer, activations, backprops)
        inputs = {t.untyped_storage().data_ptr() for t in (*activations, backprops) if isinstance(t, torch.Tensor)}
        for param, gs in list(out.items()):
            if (param.requires_grad and not hasattr(param, "_current_grad_sample")
                    and gs.shape[0] == getattr(layer, "max_batch_len", -1)
                    and gs.untyped_storage().data_ptr() not in inputs):  # a view of autograd's tensors: copy
                param._current_grad_sample = gs
                del out[param]  # Opacus' create_or_accumulate_grad_sample skips it; promote works as before
        return out
    return rows


class PerSampleGradModule(GradSampleModule):
    """Opacus' GradSampleModule (hooks mode) with the shifted-matmul Conv2d rule, and rows handed over
    rather than copied; a class-level table of its own, so Opacus' global one is left as it is."""

    GRAD_SAMPLERS = {layer: handed_over(fn) for layer, fn in
                     {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}.items()}
