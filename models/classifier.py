"""A small CNN classifier of real images: labels synthetic samples to check they look like their class."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """``centred``: the input is mapped to (x − 0.5) / 0.25 first (public constants, no statistic of any data).
    Raw [0, 1] input leaves the first epochs on a plateau near chance (val loss ≈ ln 2 for 3+ epochs at
    n = 2000, a different number of epochs per seed); centred input leaves it within one or two
    (``python -m simulations.choose_tstr_recipe``). No parameters or buffers: the state dict is the same."""

    def __init__(self, num_classes: int = 2, channels: int = 1, width: int = 32, centred: bool = False):
        super().__init__()
        self.centred = centred
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, 1, 1), nn.GroupNorm(8, o), nn.SiLU(),  # noqa: E731
                                           nn.MaxPool2d(2))
        self.features = nn.Sequential(block(channels, width), block(width, 2 * width), block(2 * width, 2 * width),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centred:
            x = (x - 0.5) / 0.25
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        self.eval()
        out = [self(torch.as_tensor(images[i:i + batch_size])).argmax(1).numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 4,
                     seed: int = 0, batch_size: int = 64, lr: float = 2e-3, centred: bool = False,
                     after_epoch: Callable[[SmallCNN, int], None] | None = None) -> SmallCNN:
    """Plain (non-private) training on real images; class-balanced sampling so skewed sets still work.
    ``after_epoch(model, epoch)`` is called after each epoch (used to trace a recipe on val)."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, images.shape[1], centred=centred)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.as_tensor(images), torch.as_tensor(labels).long()
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).float()
    weights = (1.0 / counts)[y]
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.multinomial(weights, len(y), replacement=True, generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(model, epoch)
    return model.eval()
