"""What went wrong in a run, for metrics.json and summary.txt: skipped rounds, dropouts, stragglers, rejected
updates, and which sites were charged for rounds whose update the server did not use.

The rule (README, *When a round is charged*): a site is charged when its update leaves it. A site that drops
out before training sends nothing and is not charged. An update that left but was not used — sent after the
round timeout, rejected by the server, or inside a SecAgg+ round that could not complete — stays charged:
it left the site, so it is a real privacy cost. The sites report which rounds they were charged for
(``charged-rounds``); the server compares them with the rounds that used their update.
"""
from __future__ import annotations

from typing import Any


def charged_not_used(strategy) -> dict[str, list[int]]:
    """Per site: rounds of this run it was charged for whose update is not in the global model."""
    used: dict[str, set[int]] = {}
    for r in strategy.round_metrics.values():
        for site in r.get("sites", []):
            used.setdefault(site, set()).add(int(r["round"]))
    out = {}
    for site, m in sorted(strategy.sites.items()):
        charged = [int(x) for x in str(m.get("charged-rounds", "")).split(",") if x.strip()]
        unused = sorted(set(charged) - used.get(site, set()))
        if unused:
            out[site] = unused
    return out


def robustness_lines(strategy, rounds: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {strategy.secagg_note}"] if strategy.secagg_note else []
    for r in rounds:
        if r.get("skipped"):
            lines.append(f"  round {r['round']} skipped: {r['skipped']}")
        for f in r.get("failures", []):
            lines.append(f"  round {r['round']} failure: {f}")
        for s in r.get("no-answer", []):
            lines.append(f"  round {r['round']}: {s} did not answer before the round timeout (straggler)")
        for x in r.get("rejected", []):
            lines.append(f"  round {r['round']}: rejected the update of {x['site']}: {x['reason']}")
    for site, unused in charged_not_used(strategy).items():
        lines.append(f"  charged but not used: {site} rounds {unused} (the update left the site, so the charge "
                     "stands)")
    return (["", "faults (a dropout before training is not charged; an update that left is charged even if "
             "not used):"] + lines) if lines else []
