"""Per-sample rows of K copies of one image (the diffusion model's noise draws) -> one row per image.

Kept apart from ``grad_samplers.py`` because a model imports it and must not import Opacus: Opacus calls
``logging.basicConfig`` on import, which would hide the ServerApp's own log lines wherever the server builds
a model.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

UNIT_COPIES = "unit_copies"


@contextmanager
def copies_per_row(module: nn.Module, k: int):
    """Inside: the shifted-matmul Conv2d rule returns one row per K consecutive batch rows (their mean);
    other layers still give one row per batch row, which ``rows_per_image`` then averages the same way."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        setattr(m, UNIT_COPIES, k)
    try:
        yield
    finally:
        for m in convs:
            m.__dict__.pop(UNIT_COPIES, None)


def rows_per_image(module: nn.Module, copies: int, images: int) -> None:
    """Per-sample rows of ``images`` · ``copies`` batch rows -> ``images`` rows (the mean of each image's
    copies); rows that already are per image (``copies_per_row``) are left as they are."""
    if copies == 1:
        return
    for p in module.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None or gs.shape[0] == images:
            continue
        if gs.shape[0] != images * copies:
            raise RuntimeError(f"per-sample rows: {gs.shape[0]} rows, expected {images} or {images * copies}")
        p.grad_sample = gs.view(images, copies, *gs.shape[1:]).mean(1)
