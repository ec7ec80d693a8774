"""An empirical lower bound on ε from one training run with canaries (Steinke, Nasr & Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run").

The game: m canaries, each included in the training data independently with probability ½. After training,
the auditor scores every canary (higher = "looks trained on"), guesses "in" for its top ``k_in`` scores and
"out" for its bottom ``k_out`` and abstains on the rest: r = k_in + k_out guesses, v of them correct.

If training is ε-DP with respect to each canary, the number of correct guesses is stochastically dominated
by Binomial(r, p) with p = e^ε / (e^ε + 1) (their Theorem 2: every guess is at best ε-DP randomized
response). With δ > 0 their Theorem 3 adds a term:

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v−i) − f(v)) / i,    f(u) = P[Binomial(r, p) ≥ u],

which is what ``p_value`` computes (pure ε-DP is δ = 0). The bound is the largest ε at which observing v or
more correct guesses has probability ≤ β under that null: the mechanism is then *not* (ε, δ)-DP, at
confidence 1 − β. ``audit`` searches over k; every (k_in, k_out) it tries is a separate test, so each runs
at β / (number of tries) (Bonferroni) and the reported bound is valid at 1 − β overall. (The paper's
experiments take the best k without this correction, which overstates confidence.)

Pure math on scores and inclusion flags: no model, no files. Binomial terms are computed here in log space
(``math.lgamma``), so the tests can check them against an independent implementation.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

BETA = 0.05          # 1 − confidence of the bound
EPS_MAX = 60.0       # ε beyond this is reported as this (p = e^ε/(e^ε+1) is 1 in float64 from ~37 on)
BISECT_STEPS = 60


def _log_pmf(r: int, eps: float) -> np.ndarray:
    """log P[Binomial(r, p) = k] for k = 0..r, p = e^ε/(e^ε+1), without forming 1 − p (stable for large ε)."""
    log_p = -math.log1p(math.exp(-eps))          # log(e^ε/(e^ε+1))
    log_q = -eps - math.log1p(math.exp(-eps))    # log(1/(e^ε+1))
    k = np.arange(r + 1)
    log_choose = np.array([math.lgamma(r + 1) - math.lgamma(j + 1) - math.lgamma(r - j + 1) for j in k])
    return log_choose + k * log_p + (r - k) * log_q


def binomial_tail(r: int, eps: float, v: int) -> float:
    """f(v) = P[Binomial(r, e^ε/(e^ε+1)) ≥ v]."""
    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    terms = _log_pmf(r, eps)[v:]
    top = terms.max()
    return float(min(1.0, math.exp(top) * np.exp(terms - top).sum()))


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Upper bound on P[≥ v of r guesses correct] for an (ε, δ)-DP mechanism over m canaries (Theorem 3)."""
    _check_counts(m, r, v)
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"canary audit: need ε ≥ 0 and δ in [0, 1], got ε={eps} δ={delta}")
    if v == 0:
        return 1.0
    pmf = np.exp(_log_pmf(r, eps))
    tail = float(min(1.0, pmf[v:].sum()))
    if delta == 0:
        return tail
    # (f(v−i) − f(v)) = P[v−i ≤ W < v] = pmf[v−1] + … + pmf[v−i], for i = 1..v
    below = np.cumsum(pmf[v - 1::-1])
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = BETA) -> float:
    """The largest ε (≤ EPS_MAX) at which v correct of r guesses has p-value ≤ β; 0 when even ε = 0 fits.

    Bisection: the p-value grows with ε (a larger ε makes more correct guesses likely), as in the paper's
    own search.
    """
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"canary audit: β must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    if p_value(m, r, v, EPS_MAX, delta) <= beta:
        return EPS_MAX
    lo, hi = 0.0, EPS_MAX  # p(lo) ≤ β < p(hi)
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(scores: Sequence[float], included: Sequence[bool], k_in: int, k_out: int) -> tuple[int, int]:
    """(r, v): guess "in" for the ``k_in`` highest scores, "out" for the ``k_out`` lowest; v = correct guesses.

    Ties are broken by canary index (a fixed order that knows nothing of which canaries were included).
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"canary audit: need 0 ≤ k_in, k_out and k_in + k_out ≤ m={m}, got {k_in}, {k_out}")
    order = np.argsort(-scores, kind="stable")  # highest first
    guessed_in, guessed_out = order[:k_in], order[m - k_out:] if k_out else order[:0]
    return k_in + k_out, int(included[guessed_in].sum() + (~included[guessed_out]).sum())


def default_guesses(m: int) -> list[tuple[int, int]]:
    """The (k_in, k_out) pairs ``audit`` tries: powers of two (and m/2, m) guessing both ways, or "in" only."""
    ks = sorted({2 ** j for j in range(int(math.log2(max(m, 1))) + 1)} | {m // 2, m})
    pairs = [(k, k) for k in ks if 1 <= k and 2 * k <= m] + [(k, 0) for k in ks if 1 <= k <= m]
    return list(dict.fromkeys(pairs))


def audit(scores: Sequence[float], included: Sequence[bool], delta: float = 0.0, beta: float = BETA,
          guesses: Iterable[tuple[int, int]] | None = None) -> dict:
    """The one-run lower bound on ε for membership ``scores`` (higher = member) of canaries ``included``.

    Returns the best bound over the (k_in, k_out) tried, each at level β / (number tried), and every try.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
        raise ValueError(f"canary audit: scores {scores.shape} and inclusion flags {included.shape} must be two "
                         "equally long, non-empty vectors")
    if not np.isfinite(scores).all():
        raise ValueError("canary audit: scores must be finite (a canary's loss was NaN or infinite)")
    m = len(scores)
    pairs = list(guesses) if guesses is not None else default_guesses(m)
    level = beta / len(pairs)
    tries = []
    for k_in, k_out in pairs:
        r, v = guess_counts(scores, included, k_in, k_out)
        tries.append({"k-in": k_in, "k-out": k_out, "guesses": r, "correct": v,
                      "epsilon-lower-bound": epsilon_lower_bound(m, r, v, delta, level)})
    best = max(tries, key=lambda t: (t["epsilon-lower-bound"], t["correct"] / t["guesses"]))
    return {"method": "one-run audit, Steinke, Nasr & Jagielski 2023, Theorem 3 ((ε, δ) with the 2mδ term)"
                      if delta > 0 else "one-run audit, Steinke, Nasr & Jagielski 2023, Theorem 2 (pure ε)",
            "canaries": m, "included": int(included.sum()), "delta": delta, "confidence": 1 - beta,
            "bonferroni-tries": len(pairs), "epsilon-lower-bound": best["epsilon-lower-bound"],
            "best": best, "tries": tries}


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"canary audit: need 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m})")
