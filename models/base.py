"""The interface every generator family implements (VAE now; GAN and diffusion plug in the same way)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import ClassVar

import numpy as np
import torch
from torch import nn


class Generator(nn.Module, ABC):
    """A class-conditional image generator that a site can train with DP-SGD.

    Contract with the DP trainer (client/) and the server:
    - ``private_module()`` is the only part that ever sees real images; the trainer wraps exactly it with
      Opacus and charges the accountant once per optimizer step on it.
    - ``train_step`` runs one step on a batch through the *wrapped* module and its DP optimizer.
    - ``sample`` draws images in [0, 1], shaped (n, C, H, W).
    - ``shared_weights`` / ``load_shared_weights``: the one flat, ordered set of named float32 arrays that
      leaves a site (and nothing else does).
    """

    family: ClassVar[str]

    def __init__(self, num_classes: int, channels: int, resolution: int):
        super().__init__()
        self.num_classes, self.channels, self.resolution = num_classes, channels, resolution

    def private_module(self) -> nn.Module:
        return self

    @abstractmethod
    def train_step(self, private: nn.Module, optimizer: torch.optim.Optimizer,
                   x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step on real images ``x`` with labels ``y``; returns scalar metrics."""

    @abstractmethod
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image training loss, shape (B,) (used for holdout evaluation)."""

    @abstractmethod
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images in [0, 1]; labels drawn uniformly when not given."""

    def shared_weights(self) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict((k, v.detach().cpu().numpy().astype(np.float32, copy=True))
                           for k, v in self.state_dict().items())

    def load_shared_weights(self, weights: "OrderedDict[str, np.ndarray] | list[np.ndarray]") -> None:
        names = list(self.state_dict().keys())
        if isinstance(weights, dict):  # by name (a file's order may differ from the model's)
            if set(weights) != set(names):
                missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
                raise ValueError(f"shared weights: missing {missing[:5]}, unexpected {extra[:5]}")
            arrays = [weights[n] for n in names]
        else:
            arrays = list(weights)
        if len(arrays) != len(names):
            raise ValueError(f"shared weights: expected {len(names)} arrays, got {len(arrays)}")
        own = self.state_dict()
        state = OrderedDict()
        for name, arr in zip(names, arrays):
            if tuple(arr.shape) != tuple(own[name].shape):
                raise ValueError(f"shared weights: {name} has shape {tuple(arr.shape)}, "
                                 f"expected {tuple(own[name].shape)}")
            state[name] = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        self.load_state_dict(state)

    def uniform_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # Uniform, never the site's own label histogram: that histogram is private data.
        return torch.randint(0, self.num_classes, (n,), generator=generator)
