"""Class-conditional VAE built only from layers Opacus clips per sample cheaply (Conv2d, Linear, GroupNorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Generator


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


class ConditionalVAE(Generator):
    """q(z|x,y) and p(x|z,y) with a Bernoulli likelihood (the better one under DP, see DESIGN.md).

    The decoder's output logits are a learned per-class image (a Linear on the one-hot label) plus a small
    conv decoder of (z, y): even under heavy DP noise the per-class term gives chest-shaped class averages,
    and the conv path adds the variation the latent carries.
    """

    family = "vae"

    def __init__(self, num_classes: int = 2, channels: int = 1, resolution: int = 28,
                 latent_dim: int = 16, width: int = 32, beta: float = 1.0):
        super().__init__(num_classes, channels, resolution)
        if resolution % 4:
            raise ValueError(f"vae: resolution must be a multiple of 4, got {resolution}")
        self.latent_dim, self.beta, r4 = latent_dim, beta, resolution // 4
        self.encoder = nn.Sequential(_block(channels, width, 2), _block(width, 2 * width, 2), nn.Flatten())
        self.to_posterior = nn.Linear(2 * width * r4 * r4 + num_classes, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim + num_classes, 2 * width * r4 * r4)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (2 * width, r4, r4)), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.Upsample(scale_factor=2), _block(2 * width, width),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, channels, 3, 1, 1))
        self.class_image = nn.Linear(num_classes, channels * resolution * resolution, bias=False)
        nn.init.zeros_(self.class_image.weight)

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), self.num_classes).float()

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = self._onehot(y)
        shape = (-1, self.channels, self.resolution, self.resolution)
        return self.decoder(self.from_latent(torch.cat([z, onehot], 1))) + self.class_image(onehot).view(shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image negative ELBO in nats, shape (B,)."""
        h = torch.cat([self.encoder(x), self._onehot(y)], 1)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decode_logits(z, y)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return recon + self.beta * kl

    loss = forward

    def train_step(self, private, optimizer, x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = private(x, y).mean()
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None):
        labels = self.uniform_labels(n, generator) if labels is None else labels
        z = torch.randn(n, self.latent_dim, generator=generator)
        return torch.sigmoid(self.decode_logits(z, labels))
