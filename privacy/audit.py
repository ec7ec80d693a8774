"""``fedsynth audit``: verify each site's ledger and re-derive what it spent from the mechanism parameters alone.

For every ledger: the hash chain, the Ed25519 signatures and the signed head are verified (``privacy.verify``:
an edited, removed or reordered entry, or another key, is named by file:line, run and round). Then every
charge's ε is recomputed from its recorded (σ, q, steps) with Opacus' PRV accountant (what sites use) and,
independently, with Google's dp-accounting RDP accountant (another code base and method: a looser bound, never
smaller). A recorded ε more than 1% off the recomputation, or a PRV ε above the RDP bound, fails the audit.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from .accountant import ACCOUNTANTS, Step, epsilon, merge_history
from .anchors import check_anchors
from .ledger import MECHANISM, Ledger, LedgerError
from .verify import describe

REL_TOL = 0.01  # recorded vs recomputed ε: PRV is deterministic for the same history, so 1% is generous


def audit(path: Path, expect_keys: Iterable[str] = (), anchors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Audit one ledger file, or every ``ledger.jsonl`` and ``*/ledger.jsonl`` in a folder; with ``anchors``
    (``privacy.anchors.load_anchors``) also check that every head the server anchored is still in the chain."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ledger file or folder")
    if path.is_dir():
        files = [f for f in [path / "ledger.jsonl", *sorted(path.glob("*/ledger.jsonl"))] if f.is_file()]
        if not files:
            raise ValueError(f"{path}: no ledger.jsonl or */ledger.jsonl in this folder")
    else:
        files = [path]
    sites = [audit_ledger(f, expect_keys, anchors) for f in files]
    return {"path": str(path), "ok": all(s["ok"] for s in sites), "sites": sites}


def audit_ledger(file: Path, expect_keys: Iterable[str] = (),
                 anchors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ledger = Ledger(file)
    verification = ledger.verify(expect_keys)  # raises LedgerError naming file:line for unreadable lines
    rows, refusals, plans, history, timeline = [], [], [], [], []
    for lineno, entry in ledger.lines():
        where = f"{file}:{lineno}"
        timeline.append({"line": lineno, "kind": entry["kind"], "run_id": entry.get("run_id", ""),
                         "round": entry.get("round"), "time": entry.get("time"), "rule": entry.get("rule")})
        if entry["kind"] == "refusal":
            refusals.append({"run_id": entry.get("run_id", ""), "round": entry.get("round"),
                             "reason": entry.get("reason", "")})
        elif entry["kind"] == "plan":
            plans.append({k: entry.get(k) for k in ("run_id", "model", "sigma", "clip", "sample_rate", "rounds",
                                                    "steps_per_round", "epsilon_budget", "delta", "unit",
                                                    "policy", "time")} | {"line": lineno})
        else:
            history.append(_step(entry, where))
            rows.append(_row(entry, history, lineno))

    deltas = sorted({float(r["delta"]) for r in rows})
    units = sorted({str(r["unit"]) for r in rows})
    delta = deltas[0] if deltas else None
    notes = list(verification["notes"])
    if len(deltas) > 1:
        notes.append(f"charges use different δ {deltas}; totals are at the smallest, δ={delta:g}")
    if len(units) > 1:
        notes.append(f"charges use different units {units}")
    mismatched = [[r["run_id"], r["round"]] for r in rows if r["check"] == "mismatch"]
    disagree = [[r["run_id"], r["round"]] for r in rows if r["check"] == "prv>rdp"]
    totals = {
        "epsilon_prv": epsilon(history, delta, "prv") if rows else 0.0,
        "epsilon_rdp": rdp_epsilon(history, delta) if rows else 0.0,
        "epsilon_recorded": rows[-1]["epsilon_recorded"] if rows else None,
        "check": "mismatch" if mismatched else ("prv>rdp" if disagree else "ok"),
        "mismatched_rounds": mismatched,
        "accountants_disagree": disagree,
        "delta": delta,
        "unit": units[0] if len(units) == 1 else ",".join(units) or "image",
        "steps": int(sum(s for _, _, s in history)),
        "rounds": len(rows),
        "runs": list(dict.fromkeys(r["run_id"] for r in rows)),
        "notes": notes,
    }
    ok = verification["ok"] and totals["check"] == "ok"
    out = {"site": file.parent.name, "ledger": str(file), "ok": ok, "verification": verification,
           "charges": rows, "refusals": refusals, "plans": plans, "timeline": timeline, "totals": totals}
    if anchors is not None:
        out["anchors"] = check_anchors(ledger, anchors)
        out["ok"] = ok and not out["anchors"]["problems"]
    return out


def _step(entry: dict[str, Any], where: str) -> Step:
    """The entry's mechanism parameters, checked here so a bad record is reported with its file:line."""
    sigma, q, steps, delta = entry["sigma"], entry["sample_rate"], entry["steps"], entry["delta"]
    if not (sigma > 0 and 0 < q <= 1 and 0 < delta < 1 and steps >= 0 and float(steps).is_integer()):
        raise LedgerError(f"{where}: invalid charge σ={sigma} q={q} steps={steps} δ={delta}; expected σ > 0, "
                          "q in (0, 1], a whole number of steps ≥ 0 and δ in (0, 1)")
    if entry.get("accountant", "prv") not in ACCOUNTANTS:
        raise LedgerError(f"{where}: accountant {entry['accountant']!r}; expected one of {ACCOUNTANTS}")
    if entry.get("mechanism", MECHANISM) != MECHANISM:
        raise LedgerError(f"{where}: mechanism {entry['mechanism']!r}; this audit recomputes {MECHANISM!r} only")
    return float(sigma), float(q), int(steps)


def _row(entry: dict[str, Any], history: list[Step], lineno: int) -> dict[str, Any]:
    # The site records ε over its whole ledger so far, at this charge's δ, with this charge's accountant:
    # recompute exactly that, so a faithful ledger matches whatever accountant the site was configured with.
    recomputed = epsilon(history, entry["delta"], entry.get("accountant", "prv"))
    rdp = rdp_epsilon(history, entry["delta"])
    prv = recomputed if entry.get("accountant", "prv") == "prv" else epsilon(history, entry["delta"], "prv")
    recorded = entry.get("epsilon_after")
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
        check, recorded = "unrecorded", None
    elif not math.isclose(recorded, recomputed, rel_tol=REL_TOL, abs_tol=1e-9):
        check = "mismatch"
    else:
        check = "ok" if prv <= rdp * (1 + REL_TOL) + 1e-9 else "prv>rdp"
    return {"run_id": entry.get("run_id", ""), "round": entry.get("round"), "line": lineno,
            "time": entry.get("time"), "mechanism": entry.get("mechanism", MECHANISM), "sigma": entry["sigma"],
            "clip": entry["clip"], "sample_rate": entry["sample_rate"], "steps": int(entry["steps"]),
            "delta": entry["delta"], "unit": entry.get("unit", "image"), "accountant": entry.get("accountant", "prv"),
            "released": entry.get("released"), "weights_sha256": entry.get("weights_sha256"),
            "epsilon_recorded": recorded, "epsilon_recomputed": recomputed, "epsilon_rdp": rdp, "check": check}


def rdp_epsilon(history: list[Step], delta: float) -> float:
    """ε from dp-accounting's RDP accountant: each (σ, q) Poisson-subsampled Gaussian composed ``steps`` times."""
    import dp_accounting  # imported late: only the audit needs this second accountant
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()  # add-or-remove-one neighbours, as in Opacus
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


MAX_PROBLEMS = 20  # per site in the text report (--json has them all)


def format_audit(report: dict[str, Any]) -> str:
    out = []
    for site in report["sites"]:
        t, v = site["totals"], site["verification"]
        key = f"key {v['key'][:16]} ({v['key_source']})" if v["key"] else f"key: {v['key_source']}"
        out += [f"site {site['site']}  ({site['ledger']})",
                f"  ledger: {v['entries']} entries, {key}; chain and signatures: "
                + ("verified" if v["ok"] else f"FAILED ({len(v['problems'])} problem(s))")]
        out += [f"  ✗ {describe(p)}" for p in v["problems"][:MAX_PROBLEMS]]
        if len(v["problems"]) > MAX_PROBLEMS:
            out.append(f"  ✗ … and {len(v['problems']) - MAX_PROBLEMS} more (see --json)")
        out.append(f"  {'run':<16} {'round':>5} {'released':>14} {'σ':>7} {'C':>5} {'q':>6} {'steps':>5} {'unit':>7} "
                   f"{'acct':>4} {'ε recorded':>10} {'ε PRV':>8} {'ε RDP':>8}  check")
        charges = {r["line"]: r for r in site["charges"]}
        events = [e for e in site["timeline"] if e["kind"] != "plan"]
        for e in events:
            r = charges.get(e["line"], e)
            if e["kind"] == "refusal":
                out.append(f"  {str(r['run_id']):<16} {str(r['round']):>5} {'refused':>14}  "
                           f"rule {r['rule'] or '-'} (reason below)")
                continue
            rec = "-" if r["epsilon_recorded"] is None else f"{r['epsilon_recorded']:.4f}"
            out.append(f"  {str(r['run_id']):<16} {str(r['round']):>5} {str(r['released'] or '-'):>14} "
                       f"{r['sigma']:>7.4g} {r['clip']:>5.3g} {r['sample_rate']:>6.3g} {r['steps']:>5} "
                       f"{r['unit']:>7} {r['accountant']:>4} {rec:>10} {r['epsilon_recomputed']:>8.4f} "
                       f"{r['epsilon_rdp']:>8.4f}  {r['check']}")
        if not events:
            out.append("  (no charges)")
        for r in site["refusals"]:
            out.append(f"  refused: {r['run_id']} round {r['round']}: {r['reason']}")
        rec = "-" if t["epsilon_recorded"] is None else f"{t['epsilon_recorded']:.4f}"
        delta = "-" if t["delta"] is None else f"{t['delta']:g}"
        out.append(f"  ε (PRV) = {t['epsilon_prv']:.4f}, ε (RDP, dp-accounting) = {t['epsilon_rdp']:.4f}, "
                   f"recorded = {rec} at δ = {delta}, unit {t['unit']}")
        bad = t["mismatched_rounds"] or t["accountants_disagree"]
        out.append(f"  {t['steps']} steps over {t['rounds']} rounds in {len(t['runs'])} run(s) "
                   f"{t['runs']}; ε check: {t['check']}" + (f" (rounds {bad})" if bad else ""))
        out += [f"  note: {n}" for n in t["notes"]]
        if "anchors" in site:
            a = site["anchors"]
            out.append(f"  anchored heads (server records): {a['checked']} checked, "
                       + (f"{len(a['problems'])} FAILED" if a["problems"] else "all still in the chain"))
            out += [f"  ✗ {describe(p)}" for p in a["problems"][:MAX_PROBLEMS]]
            out += [f"  note: {n}" for n in a["notes"]]
        out += [f"  verdict: {'OK' if site['ok'] else 'FAILED'}", ""]
    out.append("audit: OK — every ledger verifies and every recorded ε matches" if report["ok"] else
               "audit: FAILED — see the ✗ lines and the checks above")
    return "\n".join(out).rstrip() + "\n"
