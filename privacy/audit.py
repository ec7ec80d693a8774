"""``fedsynth audit``: what each site's ledger says it spent, re-derived from the mechanism parameters alone.

A ledger records σ, C, q and steps for every charge, and the ε the site computed after it. The audit does
not trust those ε values: it recomputes them with Opacus' PRV accountant (what sites use) and, as an
independent cross-check, with Google's dp-accounting RDP accountant (a different code base and method,
so it gives a looser but never smaller bound). A recorded ε more than 1% off the recomputation is flagged.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .accountant import ACCOUNTANTS, Step, epsilon, merge_history
from .ledger import Ledger, LedgerError

REL_TOL = 0.01  # recorded vs recomputed ε: PRV is deterministic for the same history, so 1% is generous


def audit(path: Path) -> dict[str, Any]:
    """Audit one ledger file, or every ``ledger.jsonl`` and ``*/ledger.jsonl`` in a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ledger file or folder")
    if path.is_dir():
        files = [f for f in [path / "ledger.jsonl", *sorted(path.glob("*/ledger.jsonl"))] if f.is_file()]
        if not files:
            raise ValueError(f"{path}: no ledger.jsonl or */ledger.jsonl in this folder")
    else:
        files = [path]
    return {"path": str(path), "sites": [audit_ledger(f) for f in files]}


def audit_ledger(file: Path) -> dict[str, Any]:
    entries = Ledger(file).entries()  # raises LedgerError naming file:line for unreadable lines
    # Ledger.entries skips blank lines; map each entry back to its line number for our own errors.
    linenos = [n for n, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
    rows, refusals, history = [], [], []
    for entry, lineno in zip(entries, linenos):
        if entry["kind"] == "refusal":
            refusals.append({"run_id": entry.get("run_id", ""), "round": entry.get("round"),
                             "reason": entry.get("reason", "")})
        elif entry["kind"] == "charge":
            history.append(_step(entry, f"{file}:{lineno}"))
            rows.append(_row(entry, history))

    charges = [e for e in entries if e["kind"] == "charge"]
    deltas = sorted({float(c["delta"]) for c in charges})
    units = sorted({str(c.get("unit", "image")) for c in charges})
    delta = deltas[0] if deltas else None
    notes = []
    if len(deltas) > 1:
        notes.append(f"charges use different δ {deltas}; totals are at the smallest, δ={delta:g}")
    if len(units) > 1:
        notes.append(f"charges use different units {units}")
    mismatched = [[r["run_id"], r["round"]] for r in rows if r["check"] == "mismatch"]
    totals = {
        "epsilon_prv": epsilon(history, delta, "prv") if charges else 0.0,
        "epsilon_rdp": rdp_epsilon(history, delta) if charges else 0.0,
        "epsilon_recorded": rows[-1]["epsilon_recorded"] if rows else None,
        "check": "mismatch" if mismatched else "ok",
        "mismatched_rounds": mismatched,
        "delta": delta,
        "unit": units[0] if len(units) == 1 else ",".join(units) or "image",
        "steps": int(sum(s for _, _, s in history)),
        "rounds": len(rows),
        "runs": list(dict.fromkeys(r["run_id"] for r in rows)),
        "notes": notes,
    }
    return {"site": file.parent.name, "ledger": str(file), "charges": rows, "refusals": refusals, "totals": totals}


def _step(entry: dict[str, Any], where: str) -> Step:
    """The entry's mechanism parameters, checked here so a bad record is reported with its file:line."""
    sigma, q, steps, delta = entry["sigma"], entry["sample_rate"], entry["steps"], entry["delta"]
    if not (sigma > 0 and 0 < q <= 1 and 0 < delta < 1 and steps >= 0 and float(steps).is_integer()):
        raise LedgerError(f"{where}: invalid charge σ={sigma} q={q} steps={steps} δ={delta}; expected σ > 0, "
                          "q in (0, 1], a whole number of steps ≥ 0 and δ in (0, 1)")
    if entry.get("accountant", "prv") not in ACCOUNTANTS:
        raise LedgerError(f"{where}: accountant {entry['accountant']!r}; expected one of {ACCOUNTANTS}")
    return float(sigma), float(q), int(steps)


def _row(entry: dict[str, Any], history: list[Step]) -> dict[str, Any]:
    # The site records ε over its whole ledger so far, at this charge's δ, with this charge's accountant:
    # recompute exactly that, so a faithful ledger matches whatever accountant the site was configured with.
    recomputed = epsilon(history, entry["delta"], entry.get("accountant", "prv"))
    recorded = entry.get("epsilon_after")
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
        check, recorded = "unrecorded", None
    else:
        check = "ok" if math.isclose(recorded, recomputed, rel_tol=REL_TOL, abs_tol=1e-9) else "mismatch"
    return {"run_id": entry.get("run_id", ""), "round": entry.get("round"), "sigma": entry["sigma"],
            "clip": entry["clip"], "sample_rate": entry["sample_rate"], "steps": int(entry["steps"]),
            "delta": entry["delta"], "accountant": entry.get("accountant", "prv"),
            "epsilon_recorded": recorded, "epsilon_recomputed": recomputed, "check": check}


def rdp_epsilon(history: list[Step], delta: float) -> float:
    """ε from dp-accounting's RDP accountant: each (σ, q) Poisson-subsampled Gaussian composed ``steps`` times."""
    import dp_accounting  # imported late: only the audit needs this second accountant
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()  # add-or-remove-one neighbours, as in Opacus: the unit is one image
    with _quiet("absl"):  # it warns for each fractional order it can't evaluate and then skips; not our news
        for sigma, q, steps in merge_history(history):
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return float(acc.get_epsilon(delta))


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def format_audit(report: dict[str, Any]) -> str:
    out = []
    for site in report["sites"]:
        t = site["totals"]
        out += [f"site {site['site']}  ({site['ledger']})",
                f"  {'run':<20} {'round':>5} {'σ':>7} {'C':>6} {'q':>7} {'steps':>6} {'acct':>4} "
                f"{'ε recorded':>11} {'ε recomputed':>13}  check"]
        for r in site["charges"]:
            rec = "-" if r["epsilon_recorded"] is None else f"{r['epsilon_recorded']:.4f}"
            out.append(f"  {str(r['run_id']):<20} {str(r['round']):>5} {r['sigma']:>7.4g} {r['clip']:>6.3g} "
                       f"{r['sample_rate']:>7.3g} {r['steps']:>6} {r['accountant']:>4} {rec:>11} {r['epsilon_recomputed']:>13.4f}  "
                       f"{r['check']}")
        if not site["charges"]:
            out.append("  (no charges)")
        for r in site["refusals"]:
            out.append(f"  refused: {r['run_id']} round {r['round']}: {r['reason']}")
        rec = "-" if t["epsilon_recorded"] is None else f"{t['epsilon_recorded']:.4f}"
        delta = "-" if t["delta"] is None else f"{t['delta']:g}"
        out.append(f"  ε (PRV) = {t['epsilon_prv']:.4f}, ε (RDP, dp-accounting) = {t['epsilon_rdp']:.4f}, "
                   f"recorded = {rec} at δ = {delta}, unit {t['unit']}")
        out.append(f"  {t['steps']} steps over {t['rounds']} rounds in {len(t['runs'])} run(s) "
                   f"{t['runs']}; check: {t['check']}"
                   + (f" (rounds {t['mismatched_rounds']})" if t["mismatched_rounds"] else ""))
        out += [f"  note: {n}" for n in t["notes"]] + [""]
    return "\n".join(out).rstrip() + "\n"
