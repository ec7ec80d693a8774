"""Simulated site faults (``--dropout P``, ``--straggler P``): which site fails or stalls in which round.

Drawn per (seed, round, site) from a string-seeded ``random.Random`` (sha512 of the string), so the same
seed gives the same faults in every process, on a resumed run and on any machine.

- ``dropout``: the site goes offline mid-round, after the round started (under SecAgg+: after the key
  exchange, so the server must rebuild its masks from its neighbours' shares) and *before* it trains: nothing
  is computed from its images, nothing leaves, nothing is charged.
- ``straggler``: the site trains, is charged, and sends its update only after the server's round timeout. The
  update left the site, so the charge stands even though the server no longer uses it (``metrics.json`` and
  the summary list it as charged but not used).

A fault never depends on the site's images (only on public seed, round and name), so the fact that a site
dropped out reveals nothing about them.
"""
from __future__ import annotations

import random

DROPOUT, STRAGGLER = "dropout", "straggler"


def simulated_fault(seed: int, server_round: int, site: str, dropout: float, straggler: float) -> str | None:
    """``dropout``, ``straggler`` or None for this site in this round (dropout is drawn first)."""
    if dropout <= 0 and straggler <= 0:
        return None
    u = random.Random(f"fedsynth-fault:{seed}:{server_round}:{site}").random()
    if u < dropout:
        return DROPOUT
    if u < dropout + straggler:
        return STRAGGLER
    return None


def straggler_delay(round_timeout: float) -> float:
    """How long a straggler stalls: past the timeout, but bounded so a simulation never hangs on it."""
    return round_timeout + min(5.0, 0.5 * round_timeout)
