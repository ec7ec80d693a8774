"""Class-conditional VAE built only from layers Opacus clips per sample cheaply (Conv2d, Linear, GroupNorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Generator, logits


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


class ConditionalVAE(Generator):
    """q(z|x,y) and p(x|z,y) with a Bernoulli likelihood (the better one under DP, see DESIGN.md).

    The decoder's logits are a linear map of (z, one-hot y) — per-class mean image plus a low-rank basis of
    variation, a probabilistic-PCA-like core with few parameters that DP noise can't scramble — plus, when
    ``width`` > 0, a conv refinement path (Upsample+Conv, GroupNorm) whose last layer starts at zero.
    """

    family = "vae"

    def __init__(self, num_classes: int = 2, channels: int = 1, resolution: int = 28,
                 latent_dim: int = 16, width: int = 0, beta: float = 1.0, coarse: int = 1):
        super().__init__(num_classes, channels, resolution)
        if resolution % 4:
            raise ValueError(f"vae: resolution must be a multiple of 4, got {resolution}")
        if resolution % coarse:
            raise ValueError(f"vae: resolution {resolution} must be a multiple of coarse ({coarse})")
        self.latent_dim, self.beta, r4 = latent_dim, beta, resolution // 4
        pixels = channels * resolution * resolution
        # The linear decoder works at resolution/coarse and is upsampled: coarse² fewer noisy parameters.
        self.coarse = coarse
        if width:
            self.encoder = nn.Sequential(_block(channels, width, 2), _block(width, 2 * width, 2), nn.Flatten())
            features = 2 * width * r4 * r4
        else:
            self.encoder, features = nn.Flatten(), pixels
        self.to_posterior = nn.Linear(features + num_classes, 2 * latent_dim)
        self.linear_decoder = nn.Linear(latent_dim + num_classes, pixels // coarse ** 2)
        nn.init.zeros_(self.linear_decoder.weight), nn.init.zeros_(self.linear_decoder.bias)
        self.conv_decoder = None
        if width:
            last = nn.Conv2d(width, channels, 3, 1, 1)
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
            self.conv_decoder = nn.Sequential(
                nn.Linear(latent_dim + num_classes, 2 * width * r4 * r4),
                nn.Unflatten(1, (2 * width, r4, r4)), nn.GroupNorm(8, 2 * width), nn.SiLU(),
                nn.Upsample(scale_factor=2), _block(2 * width, width), nn.Upsample(scale_factor=2), last)

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), self.num_classes).float()

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self._onehot(y)], 1)
        side = self.resolution // self.coarse
        logits = self.linear_decoder(h).view(-1, self.channels, side, side)
        if self.coarse > 1:
            logits = F.interpolate(logits, scale_factor=self.coarse, mode="bilinear", align_corners=False)
        return logits if self.conv_decoder is None else logits + self.conv_decoder(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image negative ELBO in nats, shape (B,)."""
        h = torch.cat([self.encoder(x), self._onehot(y)], 1)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + self.randn(*mu.shape) * (0.5 * logvar).exp()
        logits = self.decode_logits(z, y)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return recon + self.beta * kl

    loss = forward

    def train_step(self, private, optimizer, x, y, public=None):
        optimizer.zero_grad(set_to_none=True)
        loss = private(x, y).mean()
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def set_class_means(self, means):
        """The linear decoder's class columns become the means' logits (its bias 0): at z = 0 the decoder draws
        each class's mean image; the latent columns and the conv path (zero at init) add the variation."""
        means = self.checked_means(means, self.resolution // self.coarse)
        self.linear_decoder.weight[:, self.latent_dim:] = logits(means).flatten(1).T
        self.linear_decoder.bias.zero_()

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None):
        labels = self.uniform_labels(n, generator) if labels is None else labels.to(self.device)
        z = self.randn(n, self.latent_dim, generator=generator)
        return torch.sigmoid(self.decode_logits(z, labels))
