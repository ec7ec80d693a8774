"""Class-conditional DDPM/DDIM with a small UNet, trained privately with noise multiplicity (DPDM).

Privacy: each real image gets K noise draws per step (``noise_multiplicity``). Stock Opacus would count the
K copies as K samples (sensitivity K·C); after backward, ``rows_per_image`` replaces every per-sample
gradient by its mean over the image's K copies (the Conv2d rule builds that mean directly,
``copies_per_row``), so the DP optimizer clips, sums and noises B rows — one per image, sensitivity C — and
its accountant is charged once per step. Scaling: the wrapped module is called
with "mean" reduction over B·K rows, so Opacus' rows are per-copy gradients of the per-copy loss; their mean
over K is the gradient of the image's mean loss, and the DP optimizer divides the clipped sum by the
expected number of *images* — the same objective as the non-private mean over B·K (tests check both).

Classifier-free guidance: labels are replaced by a "null" class (index ``num_classes``) with probability
``p_uncond`` per copy. Sampling: deterministic DDIM over ``sampler_steps`` steps of a cosine schedule, from
an EMA of the weights (post-processing; a plain parameter copy, shared and averaged like the rest).
No buffers anywhere (Opacus refuses them): the schedule and time features are computed on the fly.

Defaults chosen for DP on a CPU (BENCHMARKS.md): ``coarse`` = 2 diffuses images averaged down to half
resolution with a ~13k-parameter UNet (fewer noisy coordinates, 4x cheaper steps) and upsamples samples
bilinearly, as the VAE's decoder does; ``prediction`` = "x0" regresses the clean image, whose errors
under DP noise blur instead of leaving the high-frequency noise an ε-predictor's errors leave; ``skip`` =
0.25 (EDM's c_skip blend with σ_data measured on public data, ``x0_of``) keeps samples from all landing on
the class image; ``guidance`` = 1 (no guidance: with the class-mean prior the classes stay apart without it,
and it scored better on validation than 3, at half the sampling cost).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from privacy.rows import copies_per_row, rows_per_image

from .base import Generator


# σ_data of the EDM skip blend (``x0_of``): the spread of images around their class image in the [-1, 1]
# space the model diffuses, at half resolution. Measured on the bundled training split (a public stand-in):
# per-pixel RMS around the class mean 0.227 (normal) and 0.245 (pneumonia).
SIGMA_DATA = 0.25


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """``F.pixel_unshuffle(x, 2)``, which returns an empty batch unchanged in torch 2.13 (a Poisson batch
    can be empty)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal): signal fraction at continuous time t in [0, 1]."""
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2).pow(2).clamp(1e-5, 1.0)


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    angles = 1000 * t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """Noise (or x0) predictor: one level down (stride-2 conv), one skip, one level up (Upsample + Conv).

    ``side`` None (full resolution): the input is viewed 2x2 space-to-depth and the output is upsampled back
    beside the noisy input (a sub-pixel output leaves a 2x2 grid). ``side`` given (images already averaged
    down): the net works at that side and adds a learned image per class to its output (for x0-prediction:
    the class mean, the part of the signal DP noise scrambles least, as in the VAE's linear decoder); about
    13k parameters at width 8."""

    def __init__(self, num_classes: int, channels: int, width: int, side: int | None = None, emb: int = 32):
        super().__init__()
        self.full_res = side is None
        if not self.full_res:
            self.shape = (channels, side, side)
            self.class_image = nn.Embedding(num_classes + 1, channels * side * side)
            nn.init.zeros_(self.class_image.weight)
        self.tdim = width
        self.time = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb)  # the last index is "no label" (guidance)
        self.inp = nn.Conv2d(4 * channels if self.full_res else channels, width, 3, 1, 1)
        self.down = ResBlock(width, width, emb)
        self.pool = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.mid = ResBlock(2 * width, 2 * width, emb)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, 1, 1))
        self.dec = ResBlock(2 * width, width, emb)
        head = [_norm(width), nn.SiLU(), nn.Conv2d(width, 4 if self.full_res else channels, 3, 1, 1)]
        self.out = nn.Sequential(*head, *([nn.Upsample(scale_factor=2)] if self.full_res else []))
        if self.full_res:
            self.final = nn.Conv2d(4 + channels, channels, 3, 1, 1)
            nn.init.zeros_(self.final.weight), nn.init.zeros_(self.final.bias)

    def forward(self, x, t, y):
        e = F.silu(self.time(time_features(t, self.tdim)) + self.label(y))
        h = self.down(self.inp(space_to_depth(x) if self.full_res else x), e)
        m = self.up(self.mid(self.pool(h), e))[..., :h.shape[-2], :h.shape[-1]]  # odd sizes: crop
        out = self.out(self.dec(torch.cat([h, m], 1), e))
        if self.full_res:
            return self.final(torch.cat([out, x], 1))
        return out + self.class_image(y).view(-1, *self.shape)


class ConditionalDiffusion(Generator):
    family = "diffusion"
    default_lr = (2e-3, 1e-4)
    regroups_rows = True  # rows_per_image

    def __init__(self, num_classes: int = 2, channels: int = 1, resolution: int = 28, unet_width: int = 8,
                 noise_multiplicity: int = 4, sampler_steps: int = 10, guidance: float = 1.0,
                 p_uncond: float = 0.1, ema_decay: float = 0.99, coarse: int = 2, prediction: str = "x0",
                 eta: float = 0.0, skip: float | None = None):
        super().__init__(num_classes, channels, resolution)
        if resolution % (4 if coarse == 1 else 2 * coarse):
            raise ValueError(f"diffusion: resolution {resolution} must be a multiple of {4 if coarse == 1 else 2 * coarse}")
        if prediction not in ("x0", "eps"):
            raise ValueError(f"diffusion: prediction must be 'x0' or 'eps', got {prediction!r}")
        if noise_multiplicity < 1 or sampler_steps < 1:
            raise ValueError("diffusion: noise-multiplicity and sampler-steps must be ≥ 1")
        skip = (SIGMA_DATA if prediction == "x0" else 0.0) if skip is None else skip
        if skip < 0 or (skip > 0 and prediction != "x0"):
            raise ValueError(f"diffusion: skip (σ_data) must be ≥ 0 and needs x0-prediction, got {skip}")
        if not 0 <= eta <= 1:
            raise ValueError(f"diffusion: eta must lie in [0, 1], got {eta}")
        self.k, self.sampler_steps, self.guidance = noise_multiplicity, sampler_steps, guidance
        self.p_uncond, self.ema_decay, self.coarse, self.prediction = p_uncond, ema_decay, coarse, prediction
        self.eta, self.skip = eta, skip
        self.net = (UNet(num_classes, channels, unet_width, emb=64) if coarse == 1 else
                    UNet(num_classes, channels, unet_width, resolution // coarse))
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def private_module(self):
        return self.net

    def clean(self, x, k: int) -> torch.Tensor:
        """Images as the model diffuses them: averaged down to resolution/coarse, in [-1, 1], K copies each."""
        return ((F.avg_pool2d(x, self.coarse) if self.coarse > 1 else x) * 2 - 1).repeat_interleave(k, 0)

    def corrupt(self, x, y, k: int) -> tuple[torch.Tensor, ...]:
        """K noisy copies per image, image-major (rows i·K … i·K+K-1 are image i): (x_t, t, labels, ε)."""
        x0 = self.clean(x, k)
        t = self.rand(len(x0))
        labels = y.long().repeat_interleave(k, 0)
        labels = torch.where(self.rand(len(x0)) < self.p_uncond, self.num_classes, labels)
        noise = self.randn(*x0.shape)
        a = alpha_bar(t)[:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, labels, noise

    def train_step(self, private, optimizer, x, y, public=None):
        optimizer.zero_grad(set_to_none=True)
        xt, t, labels, noise = self.corrupt(x, y, self.k)
        target = self.clean(x, self.k) if self.prediction == "x0" else noise
        with copies_per_row(private, self.k):
            loss = (self.x0_of(private(xt, t, labels), xt, t) - target).pow(2).mean()  # "mean" over B·K rows
            loss.backward()
        rows_per_image(private, self.k, len(x))  # before the step: one clipped row per image
        optimizer.step()
        with torch.no_grad():  # post-processing of the DP step
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.lerp_(p, 1 - self.ema_decay)
        return {"loss": float(loss.detach())}

    def x0_of(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0-prediction from the net's output. With ``skip`` = σ_data > 0, a blend with the noisy input
        (EDM's c_skip, Karras et al. 2022): c·x_t + (1 − c·√ᾱ)·out, c = √ᾱ σ² / (ᾱ σ² + 1 − ᾱ), the best linear
        denoiser for data of spread σ around ``out``. Near t = 0 it passes x_t through (the net need not learn
        the identity, which a DP-noised net does not), so samples keep the variation of the noise they started
        from instead of all landing on the class image; at t = 1 it is the net's output."""
        if not self.skip:
            return out
        a = alpha_bar(t if t.dim() == 0 else t[:, None, None, None])
        c = a.sqrt() * self.skip ** 2 / (a * self.skip ** 2 + 1 - a)
        return c * x + (1 - c * a.sqrt()) * out

    @torch.no_grad()
    def set_class_means(self, means):
        """The UNet's class images become the means (in the [-1, 1] space it diffuses; the "no label" image the
        mean of the classes'), in the trained weights and their EMA: the x0-prediction starts at each class's
        mean image, the part of the signal guidance amplifies."""
        if self.coarse == 1:
            raise ValueError("diffusion: the full-resolution UNet (coarse 1) has no class image; use coarse 2 or "
                             "class-mean-share 0")
        flat = (self.checked_means(means, self.resolution // self.coarse) * 2 - 1).flatten(1)
        for net in (self.net, self.ema):
            net.class_image.weight.copy_(torch.cat([flat, flat.mean(0, keepdim=True)]))

    @torch.no_grad()
    def loss(self, x, y):
        """Per-image prediction error (the training loss) of the EMA model, averaged over K noise draws."""
        xt, t, labels, noise = self.corrupt(x, y, self.k)
        target = self.clean(x, self.k) if self.prediction == "x0" else noise
        out = self.x0_of(self.ema(xt, t, y.long().repeat_interleave(self.k, 0)), xt, t)
        err = (out - target).pow(2).flatten(1).mean(1)
        return err.view(-1, self.k).mean(1)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, steps: int | None = None):
        """DDIM with classifier-free guidance from pure noise at t = 1: deterministic at ``eta`` = 0, with
        fresh noise at every step (DDPM-like ancestral sampling at ``eta`` = 1) otherwise."""
        labels = self.uniform_labels(n, generator) if labels is None else labels.long().to(self.device)
        steps, side = steps or self.sampler_steps, self.resolution // self.coarse
        x = self.randn(n, self.channels, side, side, generator=generator)
        # drawn up front for the whole batch, so that the chunking below does not change the images
        fresh = (self.randn(steps, *x.shape, generator=generator) if self.eta > 0
                 else x.new_zeros(steps, n, 1, 1, 1))
        # in chunks: small activations stay in cache (≈2x faster on CPU); same images for any chunk size
        out = torch.cat([self._ddim(xc, yc, steps, zc) for xc, yc, zc in
                         zip(x.split(128), labels.split(128), fresh.split(128, dim=1))])
        if self.coarse > 1:
            out = F.interpolate(out, scale_factor=self.coarse, mode="bilinear", align_corners=False).clamp(0, 1)
        return out

    def _ddim(self, x, labels, steps: int, fresh: torch.Tensor):
        n, net, g = len(x), self.ema, self.guidance
        both = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        ts = torch.linspace(1, 0, steps + 1, device=x.device)
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            if g == 1:
                out = net(x, t.expand(n), labels)
            else:
                cond, uncond = net(x.repeat(2, 1, 1, 1), t.expand(2 * n), both).chunk(2)
                out = uncond + g * (cond - uncond)
            a, a_next = alpha_bar(t), alpha_bar(t_next) if t_next > 0 else t.new_tensor(1.0)
            x0 = (self.x0_of(out, x, t) if self.prediction == "x0" else (x - (1 - a).sqrt() * out) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clamped x0
            # Song et al.'s σ_t(η): the share of the step's noise that is drawn afresh instead of carried
            s = self.eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)).clamp(min=0).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next - s ** 2).clamp(min=0).sqrt() * eps + s * fresh[i]
        return ((x + 1) / 2).clamp(0, 1)
