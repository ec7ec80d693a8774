"""ε for a history of Poisson-subsampled Gaussian steps, and σ calibrated for a whole planned run.

A history is a list of (noise_multiplier σ, sample_rate q, steps). Composition is commutative, so entries
with the same (σ, q) are merged before accounting; the result is the ε of every step in the history.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

from opacus.accountants import create_accountant

Step = tuple[float, float, int]
ACCOUNTANTS = ("prv", "rdp")
MAX_SIGMA = 1e3


class BudgetExhausted(ValueError):
    """The remaining budget can't pay for the planned steps at any reasonable noise level."""


def merge_history(history: Iterable[Step]) -> list[Step]:
    merged: "OrderedDict[tuple[float, float], int]" = OrderedDict()
    for sigma, q, steps in history:
        if steps < 0 or q <= 0 or q > 1 or sigma <= 0:
            raise ValueError(f"accountant: invalid step record sigma={sigma} q={q} steps={steps}")
        if steps:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items()]


def epsilon(history: Iterable[Step], delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` after every step in ``history`` (0 for an empty history)."""
    steps = merge_history(history)
    if not steps:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {ACCOUNTANTS}, got {accountant!r}")
    acc = create_accountant(mechanism=accountant)
    acc.history = steps
    return float(acc.get_epsilon(delta=delta))


def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: Iterable[Step] = (), accountant: str = "prv", tolerance: float = 0.01) -> float:
    """Smallest σ (within ``tolerance`` in ε) such that ``prior`` + ``steps`` new steps stay ≤ the target.

    Called once per run for the total number of steps the site agrees to — never per round.
    """
    prior = merge_history(prior)
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon - tolerance:
        raise BudgetExhausted(f"already spent ε={spent:.3f} of the budget ε={target_epsilon:g}")

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, sample_rate, steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    eps_hi = eps_at(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > MAX_SIGMA:
            raise BudgetExhausted(f"remaining budget (spent ε={spent:.3f} of {target_epsilon:g}) can't cover "
                                  f"{steps} steps at q={sample_rate:g} with σ ≤ {MAX_SIGMA:g}")
        eps_hi = eps_at(hi)
    # Bisect on σ, keeping ε(hi) ≤ target, until ε(hi) is within tolerance below the target.
    while target_epsilon - eps_hi > tolerance and hi - lo > 1e-4:
        mid = (lo + hi) / 2
        eps_mid = eps_at(mid)
        if eps_mid > target_epsilon:
            lo = mid
        else:
            hi, eps_hi = mid, eps_mid
    return hi


def steps_per_round(local_epochs: float, sample_rate: float) -> int:
    return max(1, math.ceil(local_epochs / sample_rate))
