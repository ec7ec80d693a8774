"""Dropouts and stragglers through the real stack: 5 simulated sites, SecAgg+, --dropout 0.2, 2 rounds (Flower + Ray, Opacus).

The faults are a documented function of (seed, round, site) — ``random.Random("fedsynth-fault:SEED:ROUND:SITE")
.random() < P`` (client/faults.py) — so the test writes the expected dropouts down from that contract, not from
the code: with seed 3, site-3 and site-4 drop out of round 1 and site-0 out of round 2. With 5 sites per round
SecAgg+ needs a majority (3) alive, so both rounds complete without the sites that dropped.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from privacy.ledger import Ledger
from server.checkpoint import load_weights
from server.strategy import FedSynthStrategy
from simulations.runner import simulate

SITES = [f"site-{k}" for k in range(5)]
DROPPED = {1: {"site-3", "site-4"}, 2: {"site-0"}}  # seed 3, P = 0.2 (see the module docstring)


@pytest.fixture(scope="module")
def dropout_run(make_run):
    run = make_run("dropout", sites=5, rounds=2, seed=3, dropout=0.2, secure=True, round_timeout=120.0)
    return run, simulate(run, reports=False)


def test_dropout_rounds_complete_without_the_sites_that_dropped(dropout_run):
    run, run_dir = dropout_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"] if r["round"] >= 1}
    assert sorted(rounds) == [1, 2] and metrics["stop-reason"] is None
    for rnd, dropped in DROPPED.items():
        assert rounds[rnd]["sites"] == sorted(set(SITES) - dropped), rnd
        assert "skipped" not in rounds[rnd]
        for site in dropped:  # each dropout is reported by name
            assert any(f.startswith(f"{site}: dropped out of round {rnd}") for f in rounds[rnd]["failures"]), (rnd, site)
        assert rounds[rnd]["no-answer"] == [] and rounds[rnd]["rejected"] == []
    assert metrics["charged-not-used"] == {}
    summary = (run_dir / "summary.txt").read_text()
    assert "2/2 rounds" in summary and "reconstruction threshold 3 of 5" in summary
    for rnd in (1, 2):
        assert np.isfinite(np.concatenate([a.ravel() for a in load_weights(
            run_dir / "checkpoints" / f"round-{rnd:03d}.safetensors").values()])).all()


def test_dropout_sites_are_charged_exactly_for_the_rounds_they_sent(dropout_run):
    run, run_dir = dropout_run
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site in SITES:
        ledger = Ledger(f"{run.state_dir}/{site}/ledger.jsonl")
        charges = [e for e in ledger.entries() if e["kind"] == "charge"]
        expected = [r for r in (1, 2) if site not in DROPPED[r]]
        assert [c["round"] for c in charges] == expected, site
        assert all(c["released"] == "weights" for c in charges)
        plan = next(e for e in ledger.entries() if e["kind"] == "plan")
        assert sum(c["steps"] for c in charges) == plan["steps_per_round"] * len(expected)
        assert privacy[site]["rounds"] == len(expected)
        assert privacy[site]["epsilon"] == pytest.approx(charges[-1]["epsilon_after"], rel=1e-9)


def test_a_straggler_times_out_and_the_secure_round_is_skipped_not_hung(make_run):
    """2 sites, SecAgg+, --straggler 0.5, seed 5: site-1 stalls in round 1 (u = 0.037 < 0.5; site-0 draws
    0.886). SecAgg+ needs both of 2 alive, so after the 20 s timeout the round is skipped, the global model
    stays, and both sites stay charged — each update left its site — and are listed as charged but not used."""
    run = make_run("straggler", sites=2, rounds=1, seed=5, straggler=0.5, secure=True, round_timeout=20.0)
    t0 = time.time()
    run_dir = simulate(run, reports=False)
    assert time.time() - t0 < 300  # bounded: the timeout, not the straggler, decides
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (r1,) = [r for r in metrics["rounds"] if r["round"] == 1]
    assert r1["no-answer"] == ["site-1"] and "secure aggregation could not complete" in r1["skipped"]
    assert metrics["charged-not-used"] == {"site-0": [1], "site-1": [1]}
    for site in ("site-0", "site-1"):
        (charge,) = Ledger(f"{run.state_dir}/{site}/ledger.jsonl").charges()
        assert charge["round"] == 1 and charge["released"] == "weights"
    summary = (run_dir / "summary.txt").read_text()
    assert "round 1 skipped" in summary and "site-1 did not answer before the round timeout" in summary
    initial = FedSynthStrategy(run).model.shared_weights()
    final = load_weights(run_dir / "weights.safetensors")
    assert all(np.array_equal(final[k], v) for k, v in initial.items())
