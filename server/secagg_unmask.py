"""The numeric core of SecAgg+'s unmask stage, on flat uint32 vectors, ending in float32.

Flower 1.42 (``SecAggPlusWorkflow.unmask_stage``) keeps the summed masked vectors as a list of int64 arrays,
subtracts each active site's private mask and adds/subtracts each dropped site's pairwise masks
(``pseudo_rand_gen``, int64), reduces mod ``mod_range``, takes the weight factor off the front, dequantizes to
float64 (``(x · 2c/qr − c − (n−1)·c) · qr/factor``) and hands float64 to the strategy. This does the mask
arithmetic on one flat uint32 vector (wrapping mod 2**32, a multiple of the power-of-two ``mod_range``, so the
residues are Flower's) with the masks fedsynth's sites drew (``fedsynth.secagg_masks.prg_uint32``: ChaCha20 keyed
by the whole seed, where Flower's generator folds it to 32 bits), dequantizes with Flower's
own float64 formula, in Flower's order, and rounds the result to float32 once: the same numbers Flower's
float64 aggregate gives after fedsynth's cast (tests/test_secagg_fast.py). With ``reference`` (deltas on the
wire), the reference is added back after dequantization, in float64.
"""
from __future__ import annotations

import numpy as np

from fedsynth.secagg_masks import apply_pairwise_masks, prg_uint32


def unmasked_average(masked: list[np.ndarray], private_seeds: list[bytes], pairwise: list[tuple[bytes, bool]],
                     mod_range: int, clipping_range: float, quantization_range: int, active: int,
                     reference: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The weighted average of the active sites' updates (float32), from the sum of their masked vectors.

    ``masked``: [weight factor, *arrays], summed over the active sites (any unsigned/signed integer dtype);
    ``private_seeds``: each active site's reconstructed private-mask seed; ``pairwise``: (shared key of a
    dropped site with a neighbour, True to add its mask / False to subtract it), as Flower orders them.
    """
    shapes = [np.shape(a) for a in masked]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = np.empty(sum(sizes), dtype=np.uint32)
    at = 0
    for arr, size in zip(masked, sizes):
        flat[at:at + size] = np.asarray(arr).reshape(-1)  # residues < mod_range ≤ 2**32: exact in uint32
        at += size
    for seed in private_seeds:
        flat -= prg_uint32(seed, mod_range, flat.size)
    apply_pairwise_masks(flat, pairwise, mod_range)
    factor = int(flat[0])
    inv_dq_total_ratio = quantization_range / factor
    quantizer = (2 * clipping_range) / quantization_range
    offset = -(active - 1) * clipping_range
    out, at = [], sizes[0]
    for i, (shape, size) in enumerate(zip(shapes[1:], sizes[1:])):
        vec = flat[at:at + size].astype(float) * quantizer + -clipping_range  # Flower's dequantize()
        vec += offset
        vec *= inv_dq_total_ratio
        if reference is not None:
            vec += np.asarray(reference[i], dtype=np.float32).reshape(-1)
        out.append(vec.astype(np.float32).reshape(shape))
        at += size
    return out
