"""Generator families behind one registry: ``build_generator("vae", num_classes=2, ...)``.

``build_generator`` passes each family only the keyword arguments its constructor takes, so one run
configuration (``RunConfig.model_kwargs()``) can carry every family's knobs.
"""
from __future__ import annotations

import inspect

from .base import Generator
from .diffusion import ConditionalDiffusion
from .gan import ConditionalGAN
from .vae import ConditionalVAE

FAMILIES: dict[str, type[Generator]] = {cls.family: cls for cls in (ConditionalVAE, ConditionalGAN,
                                                                       ConditionalDiffusion)}


def build_generator(family: str, **kwargs) -> Generator:
    if family not in FAMILIES:
        raise ValueError(f"model: unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


__all__ = ["FAMILIES", "Generator", "build_generator"]
