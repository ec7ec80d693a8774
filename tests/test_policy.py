"""A hospital's own policy, enforced by its site before any gradient: through the real ClientApp client
(``SiteClient.fit`` / ``evaluate``, real Opacus training when a round is allowed) and one tiny federation."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from client.client_app import SiteClient
from client.site import RoundRefused, Site, SiteConfig
from fedsynth.cli import main
from models import build_generator
from privacy.audit import audit
from privacy.ledger import Ledger
from privacy.policy import PolicyError, SitePolicy, policy_from_node_config
from simulations.runner import prepare_sites, simulate


@pytest.fixture()
def hospital(make_run, tmp_path):
    """A run request and one hospital's folder (data.npz from the tiny split); its ledger starts empty."""
    run = make_run("policy", state_dir=tmp_path / "state", rounds=3)
    prepare_sites(run)
    return run, tmp_path / "state" / "site-0"


def node(folder: Path, **policy) -> dict:
    return {"data-path": str(folder / "data.npz"), "site-name": "h1", **policy}


def request(run, rnd: int) -> dict:
    return {**run.to_flower(), "server-round": rnd}


def initial(run) -> list[np.ndarray]:
    return list(build_generator(run.model, **run.model_kwargs()).shared_weights().values())


def kinds(folder: Path) -> list[str]:
    return [e["kind"] for e in Ledger(folder / "ledger.jsonl").entries()]


def sha256_of(arrays) -> str:
    """The documented weights hash, written out here independently: dtype, shape, bytes of each array in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{tuple(a.shape)}".encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# --- reading a policy -----------------------------------------------------------------------------------
def test_policy_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "policy.json"
    for text, words in [('{"min-sigma": -1}', ["min-sigma", "> 0"]), ('{"max_epsilon": 2}', ["unknown", "max_epsilon"]),
                        ('{"allowed-models": 3}', ["allowed-models"]), ('{"max-rounds": 1.5}', ["max-rounds"]),
                        ('{"max-delta": 1}', ["max-delta"]), ('{"min-sigma": 1,\n oops}', [":2", "not JSON"])]:
        bad.write_text(text)
        with pytest.raises(PolicyError) as exc:
            SitePolicy.load(bad)
        assert str(bad) in str(exc.value) and all(w in str(exc.value) for w in words), str(exc.value)
    bad.write_text('{"min-sigma": 1.0, "allowed-models": ["vae", "gan"]}')
    policy = policy_from_node_config({"max-epsilon": "4", "policy-file": str(bad)})
    assert policy.rules() == {"max-epsilon": 4.0, "min-sigma": 1.0, "allowed-models": ["vae", "gan"]}
    with pytest.raises(PolicyError, match=r"\['min-sigma'\] set both in node config and in .*policy.json"):
        policy_from_node_config({"min-sigma": 2, "policy-file": str(bad)})


# --- a compliant round ----------------------------------------------------------------------------------
def test_compliant_round_trains_and_the_charge_names_what_left(hospital):
    run, folder = hospital
    client = SiteClient(node(folder, **{"max-epsilon": 2.0, "min-sigma": 0.1, "max-clip": 1.0,
                                        "max-rounds": 2, "allowed-models": "vae,gan"}))
    weights, weight, metrics = client.fit(initial(run), request(run, 1))
    assert weight == 1 and set(metrics) - {"ledger-head", "ledger-seq"} == {"site", "epsilon", "steps", "names-sha256"}
    plan, charge = Ledger(folder / "ledger.jsonl").entries()
    # the server asked for ε=3 over 3 rounds; the site agreed to ε=2 over 2
    assert (plan["epsilon_budget"], plan["rounds"], plan["rounds_requested"]) == (2.0, 2, 3)
    assert plan["policy"] == {"max-epsilon": 2.0, "min-sigma": 0.1, "max-clip": 1.0, "max-rounds": 2,
                              "allowed-models": ["vae", "gan"]}
    assert charge["released"] == "weights" and charge["weights_sha256"] == sha256_of(weights)
    assert charge["mechanism"] == "subsampled-gaussian" and charge["unit"] == "image"
    assert charge["sigma"] == plan["sigma"] and charge["steps"] == 2
    assert max(float(np.abs(w - w0).max()) for w, w0 in zip(weights, initial(run))) > 0  # it did train
    report = audit(folder / "ledger.jsonl")
    assert report["ok"] and report["sites"][0]["charges"][0]["released"] == "weights"
    # the roll call: round 2 is fine; round 3 is past the site's max-rounds, refused and logged, not charged
    assert client.evaluate(weights, request(run, 1))[2]["next-round-ok"] is True
    _, _, status = client.evaluate(weights, request(run, 2))
    assert status["next-round-ok"] is False and "max-rounds=2" in status["next-round-reason"]
    assert kinds(folder) == ["plan", "charge", "refusal"]


# --- breaches: refused before the model is even built ---------------------------------------------------
BREACHES = {
    # name: (policy, server round, rule, words in the reason)
    "sigma-too-low": ({"min-sigma": 50.0}, 1, "policy:min-sigma", ["min-sigma=50", "σ="]),
    "family-not-allowed": ({"allowed-models": "gan,diffusion"}, 1, "policy:allowed-models", ["'vae'", "not allowed"]),
    "clip-too-large": ({"max-clip": 0.5}, 1, "policy:max-clip", ["max-clip=0.5", "C=1"]),
    "too-many-rounds": ({"max-rounds": 1}, 2, "policy:max-rounds", ["max-rounds=1", "round 2"]),
    "budget-exceeded": ({"max-epsilon": 0.5}, 1, "budget", ["budget", "ε=0.5"]),
}


@pytest.mark.parametrize("name", sorted(BREACHES))
def test_breach_is_refused_before_any_gradient(hospital, name):
    run, folder = hospital
    policy, rnd, rule, words = BREACHES[name]
    if name == "budget-exceeded":  # an earlier run already spent more than the site's cap
        site = Site(SiteConfig.from_node_config(node(folder), run), num_classes=2)
        site.ledger.append({"kind": "charge", "run_id": "earlier", "round": 1, "sigma": 2.0, "clip": 1.0,
                            "sample_rate": 0.1, "steps": 10, "delta": run.delta, "accountant": "prv",
                            "unit": "image", "epsilon_after": 0.81})
        assert 0.5 < site.ledger.epsilon(run.delta) < run.epsilon  # over the site's cap, under the run's
    before = Ledger(folder / "ledger.jsonl").entries()
    client = SiteClient(node(folder, **policy))
    # No weights at all: had the site got as far as building its model, this would fail with a shape error
    # instead — so the refusal provably comes before any model, data pass or gradient.
    with pytest.raises(RoundRefused) as exc:
        client.fit([], request(run, rnd))
    assert exc.value.rule == rule and all(w in str(exc.value) for w in words), str(exc.value)
    after = Ledger(folder / "ledger.jsonl").entries()
    assert after[:len(before)] == before
    (refusal,) = after[len(before):]  # nothing but the refusal was written: no plan, no charge
    assert (refusal["kind"], refusal["round"], refusal["rule"]) == ("refusal", rnd, rule)
    assert refusal["reason"] == str(exc.value)
    assert [e for e in after if e["kind"] == "charge" and e["run_id"] == run.run_id] == []
    # The control: the same call without the policy gets past the checks and fails building the model.
    with pytest.raises(ValueError, match="shared weights: expected .* arrays, got 0"):
        SiteClient(node(folder)).fit([], request(run, rnd))


def test_policy_tightened_mid_run_refuses_the_next_round(hospital):
    run, folder = hospital
    weights, _, _ = SiteClient(node(folder)).fit(initial(run), request(run, 1))
    sigma = Ledger(folder / "ledger.jsonl").plan(run.run_id)["sigma"]
    (folder / "policy.json").write_text(json.dumps({"min-sigma": round(sigma * 2, 3)}))
    tightened = {"data-path": str(folder / "data.npz"), "site-name": "h1", "policy-file": str(folder / "policy.json")}
    _, _, status = SiteClient(tightened).evaluate(weights, request(run, 1))
    assert status["next-round-ok"] is False and "min-sigma" in status["next-round-reason"]
    assert kinds(folder) == ["plan", "charge", "refusal"]
    assert Ledger(folder / "ledger.jsonl").entries()[-1]["rule"] == "policy:min-sigma"


def test_a_ledger_that_does_not_verify_is_refused(hospital):
    run, folder = hospital
    SiteClient(node(folder)).fit(initial(run), request(run, 1))
    path = folder / "ledger.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["steps"] = 0  # "forget" a charge to free budget
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RoundRefused, match=rf"ledger: .* does not verify \({path}:2 \(charge run policy round 1\)"):
        SiteClient(node(folder)).fit([], request(run, 2))


# --- the server hears the refusal -----------------------------------------------------------------------
def test_federation_reports_a_policy_refusal(make_run, capsys):
    run = make_run("policy-fed", secure=False, rounds=1)
    prepare_sites(run)
    state = Path(run.state_dir)
    (state / "site-1" / "policy.json").write_text(json.dumps({"allowed-models": ["gan"]}))
    run_dir = simulate(run, reports=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stop-reason"] is None
    assert [r["sites"] for r in metrics["rounds"] if "sites" in r] == [["site-0"]]
    (refusal,) = metrics["refusals"]
    assert refusal["site"] == "site-1" and refusal["round"] == 1 and "allowed-models" in refusal["reason"]
    assert "refused: site-1 round 1" in (run_dir / "summary.txt").read_text()
    site1 = Ledger(state / "site-1" / "ledger.jsonl").entries()
    assert [e["kind"] for e in site1] == ["refusal"] and site1[0]["rule"] == "policy:allowed-models"
    (charge,) = Ledger(state / "site-0" / "ledger.jsonl").charges()
    assert charge["released"] == "weights" and len(charge["weights_sha256"]) == 64

    capsys.readouterr()
    assert main(["audit", str(state), "--plot", str(run_dir / "audit.png")]) == 0
    out = capsys.readouterr().out
    assert "audit: OK" in out and "allowed-models" in out
    assert (run_dir / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
