"""Per-sample gradients as Opacus computes them, with a faster Conv2d rule (``PerSampleGradModule``), and
Linear rows that are clipped and summed without being built (``FactoredRowsModule`` + ``FactoredDPOptimizer``).

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

import math

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from .input_grads import input_grads_only
from .rows import UNIT_COPIES


def _shifted_matmul_applies(layer: nn.Conv2d, n: int) -> bool:
    c_in, (kh, kw) = layer.in_channels, layer.kernel_size
    return (n > 0 and layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1)
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and c_in * kh * kw >= 32)  # below that a matmul per offset is too thin to beat one unfold


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' rows for a Conv2d layer; inside ``copies_per_row(module, K)`` (rows i·K … i·K+K−1 are K copies
    of one image) one row per image, the mean of its copies' rows, built without the K·B rows."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if not _shifted_matmul_applies(layer, n):
        return compute_conv_grad_sample(layer, activations, backprops)
    k = getattr(layer, UNIT_COPIES, 1)
    k = k if n % k == 0 else 1
    b = n // k
    c_in, c_out = x.shape[1], backprops.shape[1]
    (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
    h_out, w_out = backprops.shape[2:]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        # One extra zero row at the bottom keeps the last offset's slice inside the buffer. With K copies, the
        # copies' padded inputs lie end to end (per channel) and g sits on the same grid with zeros in every
        # column and row it lacks, so one slice per offset spans all K copies: each window's extra positions
        # (the next copy's pixels) meet zeros of g, and the matmul sums the K copies' products directly.
        w_pad = x.shape[3] + 2 * pw
        if k == 1:
            flat = F.pad(x, (pw, pw, ph, ph + 1)).reshape(n, c_in, -1)
            length = h_out * w_pad
            g = F.pad(backprops, (0, w_pad - w_out)).reshape(n, c_out, length)
        else:
            rows = x.shape[2] + 2 * ph + 1
            length = k * rows * w_pad
            flat = x.new_zeros(b, c_in, length + kh * w_pad)  # the tail: the last copy's windows stay inside
            flat[..., :length].view(b, c_in, k, rows, w_pad)[..., ph:ph + x.shape[2], pw:pw + x.shape[3]] = (
                x.view(b, k, c_in, *x.shape[2:]).transpose(1, 2))
            g = F.pad(backprops, (0, w_pad - w_out, 0, rows - h_out)).view(b, k, c_out, rows * w_pad)
            g = g.transpose(1, 2).reshape(b, c_out, length)
        dw = x.new_empty(b, c_out, c_in, kh, kw)
        for i in range(kh):
            for j in range(kw):
                start = i * w_pad + j
                dw[..., i, j] = torch.bmm(g, flat[..., start:start + length].transpose(1, 2))
        out[layer.weight] = dw if k == 1 else dw.div_(k)
    if layer.bias is not None and layer.bias.requires_grad:
        bias = backprops.sum(dim=(2, 3))
        out[layer.bias] = bias if k == 1 else bias.view(b, k, c_out).mean(1)
    return out


def handed_over(sampler):
    """Opacus stores a layer's rows by allocating zeros of the longest batch seen and copying them in (so
    rows of several backward passes can be summed). When nothing is accumulated yet and the rows already
    have that length, the copy is the same tensor: hand the rows over instead (for the VAE's 786-input
    layer, the zero fill and the copy were a third of DP-SGD's overhead)."""
    def rows(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor):
        out = sampler(layer, activations, backprops)
        inputs = {t.untyped_storage().data_ptr() for t in (*activations, backprops) if isinstance(t, torch.Tensor)}
        batch = getattr(layer, "max_batch_len", -1)
        for param, gs in list(out.items()):
            # rows of K copies already averaged per image (``privacy.rows.copies_per_row``): fewer than batch
            per_image = gs.shape[0] != batch and gs.shape[0] * getattr(layer, UNIT_COPIES, 1) == batch
            if (param.requires_grad and not hasattr(param, "_current_grad_sample")
                    and (gs.shape[0] == batch or per_image)
                    and gs.untyped_storage().data_ptr() not in inputs):  # a view of autograd's tensors: copy
                param._current_grad_sample = gs
                del out[param]  # Opacus' create_or_accumulate_grad_sample skips it; promote works as before
            elif per_image:  # they can't join Opacus' buffer of one row per batch row
                raise RuntimeError("copies_per_row: per-image rows need a single forward pass per backward")
        return out
    return rows


class PerSampleGradModule(GradSampleModule):
    """Opacus' GradSampleModule (hooks mode) with the shifted-matmul Conv2d rule, and rows handed over
    rather than copied; a class-level table of its own, so Opacus' global one is left as it is."""

    GRAD_SAMPLERS = {layer: handed_over(fn) for layer, fn in
                     {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}.items()}

    def __init__(self, module: nn.Module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        # Only where there are convolutions: for a net of Linear layers (the VAE) the torch-function mode's
        # Python call per op eats what the small weight gradients cost (0.99x, steps in random order).
        # False: autograd computes them as with stock Opacus (the step-time benchmark times both).
        self.skip_discarded_grads = any(isinstance(m, nn.Conv2d) for m in module.modules())

    def forward(self, *args, **kwargs):
        """With the hooks on (a DP step), Conv2d and Linear layers skip the weight gradients that the DP
        optimizer overwrites anyway (``privacy.input_grads``); with them off (e.g. the GAN's generator step
        through D), an ordinary forward."""
        if not (self.skip_discarded_grads and self.hooks_enabled and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        with input_grads_only(p for p in self._module.parameters() if p.requires_grad):
            return self._module(*args, **kwargs)


# Linear layers, rows kept as factors. For a Linear layer on [n, in] inputs a with output gradients b ([n, out]),
# image i's weight gradient is the outer product b_i a_iᵀ. Opacus builds all n of them ([n, out, in]: for the
# VAE's 786-input layer the largest tensor of the step, most of DP-SGD's extra time) only to take their norms
# and then their clipped sum. Neither needs them (Goodfellow 2015): over the K passes that reached the layer
# in one backward (K = 2 for the GAN's D(real) + D(fake)), ‖Σ_k b_ki a_kiᵀ‖² = Σ_k,l (b_ki·b_li)(a_ki·a_li), and
# Σ_i c_i Σ_k b_ki a_kiᵀ = Σ_k (c ⊙ b_k)ᵀ a_k. Same norms, same clip factors, same sum up to float rounding,
# so what is noised and accounted does not change (tests/test_grad_samplers.py, against Opacus).
FACTORS = "_row_factors"


def _rows_of(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The real rows Σ_k b_k a_kᵀ, [n, out, in]."""
    return sum(torch.bmm(b.unsqueeze(2), a.unsqueeze(1)) for b, a in factors)


def _bias_rows(layer: nn.Linear, activations, backprops):
    return {layer.bias: backprops} if layer.bias is not None and layer.bias.requires_grad else {}


_linear_rows, _linear_bias_rows = handed_over(compute_linear_grad_sample), handed_over(_bias_rows)


def linear_factors(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor):
    a, w, n = activations[0].to(backprops.dtype), layer.weight, backprops.shape[0]
    if hasattr(w, FACTORS) and not hasattr(w, "_current_grad_sample"):
        raise RuntimeError("factored per-sample rows of an earlier backward are still held: call the "
                           "FactoredDPOptimizer's zero_grad before the next backward (virtual steps are not supported)")
    if not (w.requires_grad and a.dim() == 2 and n > 0 and n == getattr(layer, "max_batch_len", -1)
            and (hasattr(w, FACTORS) or not hasattr(w, "_current_grad_sample"))):
        if hasattr(w, FACTORS):  # a pass that can't be factored joins the rows kept so far: build them
            w._current_grad_sample = _rows_of(w.__dict__.pop(FACTORS))
        return _linear_rows(layer, activations, backprops)
    w.__dict__.setdefault(FACTORS, []).append((backprops, a))
    if not hasattr(w, "_current_grad_sample"):
        # What Opacus stores as the rows: a NaN placeholder of the right shape and no memory. Only
        # FactoredDPOptimizer knows the factors; anything else that reads these rows gets NaN, not a silent 0.
        w._current_grad_sample = torch.full((), math.nan, dtype=a.dtype, device=a.device).expand(n, *w.shape)
    return _linear_bias_rows(layer, activations, backprops)


def per_sample_rows(p: nn.Parameter) -> torch.Tensor:
    """``p``'s per-sample gradient rows as a real tensor, built from its factors if it has them (for
    inspection: the optimizer never needs them). Like Opacus' ``grad_sample`` they last until ``zero_grad``."""
    return _rows_of(p.__dict__[FACTORS]) if hasattr(p, FACTORS) else p.grad_sample


def factored_norms(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-sample Frobenius norms of Σ_k b_k a_kᵀ, from the factors."""
    sq = sum((bk * bl).sum(1) * (ak * al).sum(1) for bk, ak in factors for bl, al in factors)
    return sq.clamp(min=0).sqrt()


class FactoredRowsModule(PerSampleGradModule):
    """``PerSampleGradModule`` whose Linear weights keep their rows as factors (see above). Use it only with
    ``FactoredDPOptimizer``, and not where a model reads or regroups ``p.grad_sample`` itself (the diffusion
    model's mean over K copies, patient-level sums): those rows are NaN placeholders here."""

    GRAD_SAMPLERS = {**PerSampleGradModule.GRAD_SAMPLERS, nn.Linear: linear_factors}


class FactoredDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer; weights with factored rows get their norms and clipped sum from the factors.
    Everything else — clip factors, the noise, scaling, the accountant's step hook — is Opacus' own code."""

    def clip_and_accumulate(self):
        if not any(hasattr(p, FACTORS) for p in self.params):
            return super().clip_and_accumulate()
        rows = self.grad_samples  # (rows over several batches can't occur: linear_factors refuses them)
        norms = [factored_norms(p.__dict__[FACTORS]) if hasattr(p, FACTORS) else g.reshape(len(g), -1).norm(2, dim=-1)
                 for p, g in zip(self.params, rows)]
        per_sample_norms = torch.stack(norms, dim=1).norm(2, dim=1)
        clip = (self.max_grad_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)  # Opacus' formula
        for p, g in zip(self.params, rows):
            _check_processed_flag(p.grad_sample)
            c = clip.to(p.dtype)
            if hasattr(p, FACTORS):
                grad = sum((c[:, None] * b.to(p.dtype)).T @ a.to(p.dtype) for b, a in p.__dict__[FACTORS])
            else:
                grad = torch.einsum("i,i...", c, g.to(p.dtype))
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none)
        for p in self.params:
            p.__dict__.pop(FACTORS, None)
