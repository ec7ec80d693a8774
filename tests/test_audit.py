"""Ledger audit (PRV recomputation + dp-accounting RDP cross-check) and the accountant's σ calibration."""
import json
import subprocess
from pathlib import Path

import pytest

from privacy.accountant import calibrate_sigma, epsilon
from privacy.audit import audit, format_audit
from privacy.ledger import Ledger, LedgerError

FEDSYNTH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fedsynth"
DELTA = 1e-5


def write_ledger(path, site, rounds, sigma=1.0, q=0.1, steps=30, run_id="run-a", refuse_round=None):
    """Charge entries exactly as client/site.py writes them (ε composed over the ledger so far)."""
    ledger = Ledger(path)
    for r in range(1, rounds + 1):
        eps = epsilon(ledger.history() + [(sigma, q, steps)], DELTA, "prv")
        ledger.append({"kind": "charge", "run_id": run_id, "round": r, "sigma": sigma, "clip": 1.0,
                       "sample_rate": q, "steps": steps, "delta": DELTA, "accountant": "prv", "unit": "image",
                       "epsilon_after": eps, "site": site})
    if refuse_round is not None:
        ledger.append({"kind": "refusal", "run_id": run_id, "round": refuse_round,
                       "reason": f"{site}: budget: too much", "site": site})
    return ledger


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    write_ledger(root / "site-0" / "ledger.jsonl", "site-0", rounds=4, refuse_round=5)
    write_ledger(root / "site-1" / "ledger.jsonl", "site-1", rounds=2, sigma=1.2)
    return root


def test_single_ledger_totals_and_rows(state):
    report = audit(state / "site-0" / "ledger.jsonl")
    (site,) = report["sites"]
    t = site["totals"]
    assert site["site"] == "site-0"
    # PRV total is the accountant's ε of every step in the ledger, and the recorded ε agrees
    assert t["epsilon_prv"] == pytest.approx(epsilon([(1.0, 0.1, 120)], DELTA, "prv"), rel=1e-9)
    assert t["epsilon_recorded"] == pytest.approx(t["epsilon_prv"], rel=1e-6)
    # RDP is an upper bound on the same mechanism, looser but not wildly so at σ≈1, q=0.1, 120 steps
    assert t["epsilon_prv"] <= t["epsilon_rdp"] < 1.5 * t["epsilon_prv"]
    assert (t["check"], t["delta"], t["unit"], t["steps"], t["rounds"], t["runs"]) == \
        ("ok", DELTA, "image", 120, 4, ["run-a"])
    assert [(r["run_id"], r["round"], r["sigma"], r["clip"], r["sample_rate"], r["steps"], r["check"])
            for r in site["charges"]] == [("run-a", k, 1.0, 1.0, 0.1, 30, "ok") for k in range(1, 5)]
    eps = [r["epsilon_recomputed"] for r in site["charges"]]
    assert eps == sorted(eps) and eps[0] == pytest.approx(epsilon([(1.0, 0.1, 30)], DELTA))
    assert site["refusals"] == [{"run_id": "run-a", "round": 5, "reason": "site-0: budget: too much"}]
    text = format_audit(report)
    assert "ε (PRV) = " in text and "ε (RDP, dp-accounting) = " in text and "unit image" in text
    assert "refused: run-a round 5" in text


def test_folder_with_two_sites(state):
    sites = {s["site"]: s for s in audit(state)["sites"]}
    assert set(sites) == {"site-0", "site-1"}
    assert sites["site-1"]["totals"]["epsilon_prv"] == pytest.approx(epsilon([(1.2, 0.1, 60)], DELTA))
    assert sites["site-1"]["refusals"] == []


def test_cli_json(state):
    proc = subprocess.run([str(FEDSYNTH), "audit", str(state), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [s["site"] for s in report["sites"]] == ["site-0", "site-1"]


def test_tampered_epsilon_is_flagged(tmp_path):
    path = tmp_path / "site-x" / "ledger.jsonl"
    write_ledger(path, "site-x", rounds=3)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["epsilon_after"] *= 0.8  # a site under-reporting round 2
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    t = audit(path)["sites"][0]["totals"]
    assert t["check"] == "mismatch" and t["mismatched_rounds"] == [["run-a", 2]]
    assert "mismatch" in format_audit(audit(path))


def test_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, "s", rounds=1)
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(LedgerError, match=rf"{path}:2"):
        audit(tmp_path)


def test_invalid_charge_names_file_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append({"kind": "charge", "run_id": "r", "round": 1, "sigma": 1.0, "clip": 1.0,
                         "sample_rate": 1.5, "steps": 3, "delta": DELTA})
    with pytest.raises(LedgerError, match=rf"{path}:1"):
        audit(path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        audit(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=str(tmp_path)):
        audit(tmp_path)


def test_calibrate_sigma_hits_target():
    target, q, steps = 4.0, 0.1, 100
    sigma = calibrate_sigma(target, DELTA, q, steps)
    assert target - 0.05 < epsilon([(sigma, q, steps)], DELTA) <= target
    prior = [(1.5, q, 60)]
    sigma2 = calibrate_sigma(target, DELTA, q, steps, prior=prior)
    assert sigma2 > sigma  # part of the budget is already spent: more noise for the same steps
    assert target - 0.05 < epsilon(prior + [(sigma2, q, steps)], DELTA) <= target
