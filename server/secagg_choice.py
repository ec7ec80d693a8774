"""SecAgg+ parameters chosen from the number of sites sampled per round, and why (written to the run summary).

- ``num_shares = 1.0``: every sampled site shares its key material with every other sampled site (a complete
  neighbour graph). Messages grow with n², which is fine for hospital federations (tens of sites per
  round); it gives the most tolerance to dropouts.
- reconstruction threshold t = ⌊n/2⌋ + 1 (at least 2), a strict majority of the n sampled sites: t shares
  rebuild a dropped site's masks, so a coalition of fewer than t sites (a minority) with the server can't
  unmask anyone, and a round completes while at least t sites stay alive — it survives n − t dropouts.
  Flower takes the threshold as a fraction of the sampled sites (t/n), so a round with fewer willing
  sites keeps (about) a majority.
"""
from __future__ import annotations

import math


def majority_threshold(n: int) -> int:
    return max(2, n // 2 + 1)


def round_failure_probability(n: int, t: int, p: float) -> float:
    """P(more than n − t of n sites drop out), each independently with probability p."""
    return float(sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n - t + 1, n + 1)))


def secagg_choice(sampled: int, fail_probability: float = 0.0) -> tuple[dict[str, float], str]:
    """(``num_shares``/``reconstruction_threshold`` for SecAggPlusWorkflow, one line saying why)."""
    n = max(2, sampled)
    t = majority_threshold(n)
    params = {"num_shares": 1.0, "reconstruction_threshold": t / n}
    why = (f"SecAgg+: {n} sites per round all share keys with each other (num_shares=1.0); reconstruction "
           f"threshold {t} of {n} (a strict majority: fewer than {t} colluding sites learn nothing, and a round "
           f"survives up to {n - t} dropouts)")
    if fail_probability > 0:
        why += (f"; with each site failing with probability {fail_probability:g}, a round fails with probability "
                f"{round_failure_probability(n, t, fail_probability):.1%} and is then skipped")
    return params, why
