"""Whole federations through the real stack: Flower's Simulation Engine (Ray), Opacus DP-SGD, SecAgg+.

Four tiny simulations (2 sites, 2 rounds of 2 DP steps on 600 images) serve every test here:

- ``first``: SecAgg+ on, budget ε=3, fresh state, with the   -> end-to-end run folder and privacy bookkeeping
  reports (tests/conftest.py; its report: tests/test_report.py);
- ``second``: budget ε=6 on a copy of ``first``'s state      -> ε composes across runs;
- ``refused``: budget ε=3 on another copy, through the CLI -> every site refuses, the run ends cleanly;
- ``partial``: δ between the sites' 1/N, SecAgg+ off        -> one site refuses, the other trains alone.

SecAgg+ on and off giving the same global weights: tests/test_outgoing.py (its two federations).
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant
from PIL import Image

from fedsynth.config import RunConfig
from privacy.audit import audit, rdp_epsilon
from privacy.ledger import Ledger
from server.checkpoint import load_weights
from server.strategy import FedSynthStrategy
from simulations.runner import simulate

FEDSYNTH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fedsynth"
SITES = ["site-0", "site-1"]
RUN_FILES = ["weights.safetensors", "config.json", "metrics.json", "privacy.json", "summary.txt", "samples.png",
             "epsilon.png", "agreement.json", "checkpoints/round-001.safetensors", "checkpoints/round-001.json"]


# --- helpers ------------------------------------------------------------------------------------------
def read_json(path):
    return json.loads(path.read_text())


def entries(state_dir, site, kind=None, run_id=None):
    return [e for e in Ledger(state_dir / site / "ledger.jsonl").entries()
            if (kind is None or e["kind"] == kind) and (run_id is None or e.get("run_id") == run_id)]


def initial_weights(run: RunConfig):
    """The global model the server starts a run from (what FedSynthStrategy sends in round 1)."""
    return FedSynthStrategy(run).model.shared_weights()


def max_abs_diff(a, b) -> float:
    assert sorted(a) == sorted(b), "different weight names"  # by name: a file's order may differ
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)


def fresh_prv(history, delta) -> float:
    acc = PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def pld_epsilon(history, delta) -> float:
    acc = PLDAccountant()  # add-or-remove-one neighbours, as Opacus
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
    return float(acc.get_epsilon(delta))


# --- the runs -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first(first_run):
    return first_run  # tests/conftest.py: shared with tests/test_report.py


@pytest.fixture(scope="module")
def second(first, make_run, copy_state):
    run1, _ = first
    state = copy_state(run1.state_dir, "second-state")  # the first run's ledgers, left intact for other tests
    run = make_run("second", state_dir=state, secure=True, epsilon=6.0)
    return run, simulate(run, reports=False)


@pytest.fixture(scope="module")
def refused(first, make_run, copy_state):
    """Budget ε=3 again on a state whose sites already spent ≈3: run through the CLI, like a user would."""
    run1, _ = first
    state = copy_state(run1.state_dir, "refused-state")
    run = make_run("refused", state_dir=state, secure=True, epsilon=3.0)
    cmd = [str(FEDSYNTH), "simulate", "--sites", str(run.sites), "--rounds", str(run.rounds),
           "--epsilon", str(run.epsilon), "--delta", str(run.delta), "--sample-rate", str(run.sample_rate),
           "--local-epochs", str(run.local_epochs), "--partition", run.partition, "--secure",
           "--data", run.data_path, "--state-dir", run.state_dir, "--out", run.out_dir,
           "--run-id", run.run_id, "--seed", str(run.seed), "--no-report"]  # the reports: tests/test_report.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return run, run.run_dir, proc


# --- 1. end to end ------------------------------------------------------------------------------------
def test_end_to_end_run_folder(first):
    run, run_dir = first
    for name in RUN_FILES + ["checkpoints/round-002.safetensors", "checkpoints/round-002.json"]:
        assert (run_dir / name).is_file(), f"missing {name} in {run_dir}"

    for png in ("samples.png", "epsilon.png"):
        with Image.open(run_dir / png) as im:
            im.verify()
        with Image.open(run_dir / png) as im:
            assert im.format == "PNG" and im.width >= 200 and im.height >= 100, (png, im.size)
            assert np.asarray(im.convert("L")).std() > 1.0, f"{png} is a blank image"

    config = read_json(run_dir / "config.json")
    assert config["run-id"] == "first" and config["secure"] is True and config["sites"] == 2
    absolute = {k: str(Path(getattr(run, k)).resolve()) for k in ("state_dir", "out_dir", "data_path")}
    assert RunConfig.from_flower(config) == run.replace(**absolute)

    metrics = read_json(run_dir / "metrics.json")
    assert metrics["stop-reason"] is None and metrics["refusals"] == []
    trained = [r for r in metrics["rounds"] if r.get("sites")]
    assert [r["round"] for r in trained] == [1, 2] and all(r["sites"] == SITES for r in trained)
    assert all(r["failures"] == [] for r in trained)

    summary = (run_dir / "summary.txt").read_text()
    assert "2/2 rounds" in summary and "all rounds completed" in summary and "on (SecAgg+)" in summary

    # the final checkpoint is the global model the run folder ships
    weights = load_weights(run_dir / "weights.safetensors")
    assert max_abs_diff(weights, load_weights(run_dir / "checkpoints/round-002.safetensors")) == 0.0
    ckpt = read_json(run_dir / "checkpoints/round-001.json")
    assert ckpt["round"] == 1 and ckpt["run_id"] == "first" and ckpt["metrics"]["sites"] == SITES
    assert max_abs_diff(weights, initial_weights(run)) > 1e-3, "two rounds of training left the model unchanged"

    agreement = read_json(run_dir / "agreement.json")
    assert 0.0 <= agreement["agreement"] <= 1.0 and set(agreement["per-class"]) == {"0", "1"}


def test_end_to_end_privacy_matches_ledgers_and_audit(first):
    run, run_dir = first
    state = Path(run.state_dir)
    privacy = read_json(run_dir / "privacy.json")
    report = audit(state)
    assert [s["site"] for s in report["sites"]] == SITES == sorted(privacy)
    for i, site in enumerate(SITES):
        charges = entries(state, site, "charge")
        assert [(c["run_id"], c["round"]) for c in charges] == [("first", 1), ("first", 2)]
        assert all(c["steps"] == 2 and c["sample_rate"] == 0.1 and c["clip"] == 1.0 for c in charges)
        eps = privacy[site]["epsilon"]
        assert eps == pytest.approx(charges[-1]["epsilon_after"], rel=1e-6)
        totals = report["sites"][i]["totals"]
        assert totals["check"] == "ok" and totals["steps"] == 4 and totals["rounds"] == 2
        assert eps == pytest.approx(totals["epsilon_prv"], rel=1e-6)
        # the plan spends (nearly) the whole budget, and never more
        assert 2.5 < eps <= run.epsilon + 1e-9
        assert privacy[site]["epsilon-budget"] == run.epsilon and privacy[site]["delta"] == run.delta
        assert privacy[site]["sigma"] == pytest.approx(charges[0]["sigma"]) and privacy[site]["steps"] == 4
        assert privacy[site]["rounds"] == privacy[site]["rounds-this-run"] == 2
        assert privacy[site]["unit"] == "image" and privacy[site]["accountant"] == "prv"


# --- 2. ε composes across runs sharing a state folder -------------------------------------------------
def test_second_run_starts_from_first_runs_epsilon(first, second):
    run1, run1_dir = first
    run2, run2_dir = second
    state = Path(run2.state_dir)
    first_privacy = read_json(run1_dir / "privacy.json")
    second_privacy = read_json(run2_dir / "privacy.json")
    metrics = read_json(run2_dir / "metrics.json")
    assert metrics["stop-reason"] is None
    roll_call = next(r for r in metrics["rounds"] if r["round"] == 0)
    for site in SITES:
        eps1 = first_privacy[site]["epsilon"]
        charges = entries(state, site, "charge")
        assert [(c["run_id"], c["round"]) for c in charges] == [("first", 1), ("first", 2),
                                                                ("second", 1), ("second", 2)]
        # before any training the site reports what the first run spent, and its first charge adds to it
        assert roll_call["epsilon"][site] == pytest.approx(eps1, rel=1e-9)
        assert charges[2]["epsilon_after"] > eps1 + 1e-3
        assert charges[1]["epsilon_after"] == pytest.approx(eps1, rel=1e-9)
        # σ for the second run was calibrated on top of the first run's steps
        (plan,) = entries(state, site, "plan", "second")
        assert plan["epsilon_budget"] == 6.0 and plan["sigma"] < charges[0]["sigma"]

        history = [(c["sigma"], c["sample_rate"], c["steps"]) for c in charges]
        final = charges[-1]["epsilon_after"]
        assert second_privacy[site]["epsilon"] == pytest.approx(final, rel=1e-6)
        assert second_privacy[site]["rounds"] == 4 and second_privacy[site]["rounds-this-run"] == 2
        assert second_privacy[site]["steps"] == 8
        assert eps1 < final <= 6.0 + 1e-9

        # independent recomputation: a fresh Opacus PRV accountant over the raw (unmerged) history ...
        prv = fresh_prv(history, run2.delta)
        assert final == pytest.approx(prv, rel=0.01)
        # ... and Google's dp-accounting: PLD (tight, like PRV) and RDP (a looser upper bound)
        pld = pld_epsilon(history, run2.delta)
        assert pld == pytest.approx(prv, rel=0.03), (pld, prv)
        rdp = rdp_epsilon(history, run2.delta)
        assert prv <= rdp < 1.3 * prv, (rdp, prv)


# --- 3. a site that can't pay refuses; the run ends cleanly and says why -------------------------------
def test_exhausted_budget_refusal_via_cli(first, refused):
    run1, run1_dir = first
    run, run_dir, proc = refused
    state = Path(run.state_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused" in proc.stdout and "budget" in proc.stdout, proc.stdout[-3000:]
    assert "stopped early" in proc.stdout

    metrics = read_json(run_dir / "metrics.json")
    reason = metrics["stop-reason"]
    assert reason and "budget" in reason and all(site in reason for site in SITES), reason
    assert {r["site"] for r in metrics["refusals"]} == set(SITES)
    assert all(r["round"] == 1 and "budget" in r["reason"] for r in metrics["refusals"])
    assert not any(r.get("sites") for r in metrics["rounds"]), "a round trained although every site refused"
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())

    summary = (run_dir / "summary.txt").read_text()
    assert "0/2 rounds" in summary and f"stopped early: {reason}" in summary
    assert all(f"refused: {site} round 1" in summary for site in SITES)

    for site in SITES:
        refusals = entries(state, site, "refusal", "refused")
        assert refusals and all("budget" in r["reason"] for r in refusals)
        assert entries(state, site, "charge", "refused") == [], "a refused run was charged"
        assert entries(state, site, "plan", "refused") == []
        # the ledger's ε is unchanged: still the first run's
        first_eps = read_json(run1_dir / "privacy.json")[site]["epsilon"]
        assert read_json(run_dir / "privacy.json")[site]["epsilon"] == pytest.approx(first_eps, rel=1e-9)

    # nothing trained: the shipped global model is the run's initial model, bit for bit
    config = read_json(run_dir / "config.json")
    assert config["run-id"] == "refused" and config["epsilon"] == 3.0
    weights = load_weights(run_dir / "weights.safetensors")
    assert max_abs_diff(weights, initial_weights(RunConfig.from_flower(config))) == 0.0


def test_site_that_cannot_meet_delta_refuses_and_the_other_trains(make_run):
    """In-process form: the simulate call returns normally; only the site that can take part is charged.

    δ is chosen between the two sites' 1/N, so the bigger site (δ ≥ 1/N) refuses and the smaller trains alone
    (plain aggregation: SecAgg+ would need two sites)."""
    from client.data import load_dataset
    from simulations.partition import partition_sites

    base = make_run("partial", secure=False)
    labels = load_dataset(base.data_file, "train").labels
    sizes = [len(p.train) for p in partition_sites(labels, base.sites, base.partition, base.seed,
                                                    base.holdout_fraction)]
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    assert sizes[small] < sizes[big]
    run = base.replace(delta=math.sqrt(1 / sizes[small] * 1 / sizes[big]))
    run_dir = simulate(run, reports=False)  # no exception
    state = Path(run.state_dir)
    refuser, trainer = f"site-{big}", f"site-{small}"

    metrics = read_json(run_dir / "metrics.json")
    assert metrics["stop-reason"] is None
    assert [r["sites"] for r in metrics["rounds"] if "sites" in r] == [[trainer], [trainer]]
    assert {(r["site"], r["round"]) for r in metrics["refusals"]} == {(refuser, 1), (refuser, 2)}
    assert all("δ" in r["reason"] and "1/N" in r["reason"] for r in metrics["refusals"])
    summary = (run_dir / "summary.txt").read_text()
    assert "2/2 rounds" in summary and f"refused: {refuser} round 1" in summary

    assert entries(state, refuser, "charge") == [] and entries(state, refuser, "plan") == []
    assert {r["round"] for r in entries(state, refuser, "refusal")} == {1, 2}
    assert [c["round"] for c in entries(state, trainer, "charge")] == [1, 2]
    privacy = read_json(run_dir / "privacy.json")
    assert privacy[refuser]["epsilon"] == 0.0 and privacy[refuser]["steps"] == 0
    assert 0 < privacy[trainer]["epsilon"] <= run.epsilon + 1e-9
    # the global model is the one site's update, so training did move it
    weights = load_weights(run_dir / "weights.safetensors")
    assert max_abs_diff(weights, initial_weights(run)) > 1e-3


# --- 4. CLI contract ------------------------------------------------------------------------------------
HELP_FLAGS = {
    "simulate": ["--model", "--sites", "--rounds", "--epsilon", "--delta", "--partition", "--secure",
                 "--no-secure", "--data", "--state-dir", "--out", "--seed", "--class-mean-share", "--no-report"],
    "generate": ["--n", "--label", "--out"],
    "audit": ["--json"],
}


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_cli_help_names_every_flag(command):
    proc = subprocess.run([str(FEDSYNTH), command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    words = set(proc.stdout.replace("[", " ").replace("]", " ").replace(",", " ").split())
    missing = [flag for flag in HELP_FLAGS[command] if flag not in words]
    assert not missing, f"{command} --help lacks {missing}:\n{proc.stdout}"


@pytest.mark.parametrize("args, words", [
    (["--partition", "dirichlet:-1"], ["--partition", "dirichlet", "alpha"]),
    (["--partition", "zipf:2"], ["--partition", "zipf"]),
    (["--sites", "0"], ["sites"]),
    (["--class-mean-share", "1.5"], ["class-mean-share", "[0, 1)"]),
])
def test_cli_bad_flag_value_exits_nonzero_naming_it(args, words, tmp_path):
    proc = subprocess.run([str(FEDSYNTH), "simulate", *args, "--state-dir", str(tmp_path / "s"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert all(w.lower() in proc.stderr.lower() for w in words), proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists(), "a bad flag still started a run"
