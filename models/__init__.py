"""Generator families behind one registry: ``build_generator("vae", num_classes=2, ...)``."""
from __future__ import annotations

from .base import Generator
from .vae import ConditionalVAE

FAMILIES: dict[str, type[Generator]] = {cls.family: cls for cls in (ConditionalVAE,)}


def build_generator(family: str, **kwargs) -> Generator:
    if family not in FAMILIES:
        raise ValueError(f"model: unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family](**kwargs)


__all__ = ["FAMILIES", "Generator", "build_generator"]
