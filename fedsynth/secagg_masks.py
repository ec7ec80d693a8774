"""SecAgg+'s mask generator as uint32, shared by the site (masking) and the server (unmasking).

Flower 1.42's ``pseudo_rand_gen(seed, num_range, shapes)`` folds the 32-byte seed into 32 bits (XOR of its
4-byte words), seeds ``np.random.RandomState`` with it and draws ``randint(0, num_range - 1, shape,
dtype=int64)`` for each shape in turn. For ``num_range`` ≤ 2**32 numpy's legacy ``randint`` draws one 32-bit
word per value (masked rejection) whether the dtype is int64 or uint32, so drawing all the shapes at once as
uint32 gives the same numbers, in half the memory (tests/test_secagg_fast.py checks this against Flower's).
"""
from __future__ import annotations

import numpy as np

UINT32_MODULUS = 2 ** 32


def prg_uint32(seed: bytes, num_range: int, size: int) -> np.ndarray:
    """Flower's ``pseudo_rand_gen(seed, num_range, shapes)``, flattened and concatenated, as uint32."""
    if len(seed) & 0x3:
        raise ValueError(f"SecAgg+ mask seed must be a multiple of 4 bytes long, got {len(seed)}")
    if num_range > UINT32_MODULUS:
        raise ValueError(f"SecAgg+ modulus_range must be ≤ 2**32 for uint32 masks, got {num_range}")
    seed32 = 0
    for i in range(0, len(seed), 4):
        seed32 ^= int.from_bytes(seed[i: i + 4], "little")
    return np.random.RandomState(seed32).randint(0, num_range - 1, size, dtype=np.uint32)


def wire_dtype(mod_range: int) -> np.dtype:
    """The smallest unsigned dtype that holds every residue mod ``mod_range`` (a power of two ≤ 2**32): its
    wrap-around arithmetic is then arithmetic mod a multiple of ``mod_range``."""
    return np.dtype(np.uint16) if mod_range <= 2 ** 16 else np.dtype(np.uint32)


def apply_pairwise_masks(flat: np.ndarray, pairwise: list[tuple[bytes, bool]], mod_range: int) -> None:
    """In place on a flat uint32 vector: add (True) or subtract (False) the mask of each shared key, in order
    (uint32 wraps mod 2**32), then reduce mod ``mod_range`` — Flower's pairwise-mask loop and ``parameters_mod``."""
    for key, add in pairwise:
        mask = prg_uint32(key, mod_range, flat.size)
        if add:
            flat += mask
        else:
            flat -= mask
    flat &= np.uint32(mod_range - 1)
