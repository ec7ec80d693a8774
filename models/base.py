"""The interface every generator family implements (VAE, GAN, diffusion)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import contextmanager
from typing import ClassVar, Iterable

import numpy as np
import torch
from torch import nn


class Generator(nn.Module, ABC):
    """A class-conditional image generator that a site can train with DP-SGD.

    Contract with the DP trainer (client/) and the server:
    - ``private_module()`` is the only part that ever sees real images; the trainer wraps exactly it with
      Opacus and charges the accountant once per optimizer step on it.
    - ``train_step`` runs one step on a batch through the *wrapped* module and its DP optimizer: exactly one
      ``optimizer.step()`` (one accountant step) per call, whatever else it does.
    - Parameters outside ``private_module()`` never see real images (the GAN's generator, the diffusion EMA);
      ``public_optimizer(lr)`` returns a plain optimizer over the trainable ones (or None), which the trainer
      passes to ``train_step`` as ``public`` and schedules like the private one. Updating them from the
      private module's outputs is post-processing: it must not step the DP optimizer nor leave per-sample
      gradients behind (see ``per_sample_grads_off``).
    - ``sample`` draws images in [0, 1], shaped (n, C, H, W).
    - ``shared_weights`` / ``load_shared_weights``: the one flat, ordered set of named float32 arrays that
      leaves a site (and nothing else does).
    """

    family: ClassVar[str]
    default_lr: ClassVar[tuple[float, float]] = (2e-2, 5e-4)  # (lr, lr-final) the CLI uses without --lr
    # True when ``train_step`` reads or regroups the per-sample rows (``p.grad_sample``) itself before the
    # optimizer step: the trainer must then build every row (no factored Linear rows, privacy/grad_samplers.py).
    regroups_rows: ClassVar[bool] = False

    def __init__(self, num_classes: int, channels: int, resolution: int):
        super().__init__()
        self.num_classes, self.channels, self.resolution = num_classes, channels, resolution

    def private_module(self) -> nn.Module:
        return self

    def optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The base optimizer for a parameter set (the trainer wraps the private one in a DPOptimizer)."""
        return torch.optim.Adam(params, lr=lr)

    def public_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """Optimizer over trainable parameters outside ``private_module()``; None when there are none."""
        return None

    @abstractmethod
    def train_step(self, private: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, public: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """One DP optimizer step on real images ``x`` with labels ``y``; returns scalar metrics (key "loss")."""

    @abstractmethod
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image training loss, shape (B,) (used for holdout evaluation)."""

    @abstractmethod
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images in [0, 1]; labels drawn uniformly when not given."""

    def set_class_means(self, means: torch.Tensor) -> None:
        """Make ``means`` (K, C, H/coarse, W/coarse) in [0, 1] — the class-mean release of round 0
        (privacy/class_means.py) — the family's class prior, where its samples of class k start from."""
        raise NotImplementedError(f"{self.family}: this family takes no class-mean prior (class-mean-share 0)")

    def checked_means(self, means: torch.Tensor, side: int) -> torch.Tensor:
        want = (self.num_classes, self.channels, side, side)
        if tuple(means.shape) != want:
            raise ValueError(f"{self.family}: class means must be shaped {want}, got {tuple(means.shape)}")
        return means.float()

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

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # Every random draw is made on the CPU and then moved: a seed gives the same noise, labels and timesteps on
    # a GPU as on the CPU (only float rounding differs), and a CPU torch.Generator works on either device.
    def randn(self, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(self.device)

    def rand(self, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(self.device)

    def uniform_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # Uniform, never the site's own label histogram: that histogram is private data.
        return torch.randint(0, self.num_classes, (n,), generator=generator).to(self.device)


def logits(means: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """Pre-sigmoid values of mean images in [0, 1] (clamped to [eps, 1 − eps]: a saturated pixel has no logit)."""
    m = means.clamp(eps, 1 - eps)
    return torch.log(m) - torch.log1p(-m)


@contextmanager
def per_sample_grads_off(private: nn.Module, optimizer: torch.optim.Optimizer):
    """Backward through the private module without touching DP state (Opacus' dcgan.py pattern).

    Inside: Opacus' hooks are off, so no activations or per-sample gradients are recorded. On exit: hooks
    back on and the private module's gradients cleared (``grad``, ``grad_sample``, ``summed_grad``), so the
    next DP step starts clean. Works on a plain module too (non-private baseline).
    """
    hooks = hasattr(private, "disable_hooks")
    if hooks:
        private.disable_hooks()
    try:
        yield
    finally:
        if hooks:
            private.enable_hooks()
        optimizer.zero_grad(set_to_none=True)
