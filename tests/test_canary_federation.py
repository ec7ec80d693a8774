"""A tiny SecAgg+ federation with canaries at site-0 (the real engine, Opacus, SecAgg+): the canary audit's bound
stays below the accounted ε, and the ledger heads the server anchored catch a ledger rewritten with the site's key.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from client.data import load_dataset
from client.site import Site, SiteConfig
from fedsynth.cli import main
from privacy.anchors import load_anchors
from privacy.keys import fingerprint, load_public
from privacy.ledger import RESERVED, Ledger

M = 64


@pytest.fixture(scope="module")
def canary_run(make_run):
    from simulations.runner import simulate

    run = make_run("canary", rounds=1, secure=True, audit_canaries=M)
    return run, simulate(run)


def test_canary_bound_is_reported_and_below_the_accounted_epsilon(canary_run):
    run, run_dir = canary_run
    result = json.loads((run_dir / "canary-audit.json").read_text())
    assert result["canaries"] == M and result["site"] == "site-0"
    accounted = result["epsilon-accounted-this-run"]
    assert 0 < accounted <= run.epsilon + 1e-9
    assert 0 <= result["epsilon-lower-bound"] <= accounted and not result["exceeds-accounted"]
    # the accounted ε is this run's charges at site-0, as the ledger holds them
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["site-0"]["canary-audit"]["epsilon-lower-bound"] == result["epsilon-lower-bound"]
    assert accounted == pytest.approx(privacy["site-0"]["epsilon"], rel=1e-6)  # a fresh state: one run only
    assert "canary audit (site-0" in (run_dir / "summary.txt").read_text()
    assert "WARNING" not in (run_dir / "summary.txt").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    in_report = report["privacy"]["per-site"]["site-0"]["canary-audit"]
    assert in_report["epsilon-lower-bound"] == result["epsilon-lower-bound"]


def test_site0_trains_on_exactly_the_included_canaries(canary_run):
    run, run_dir = canary_run
    state = Path(run.state_dir)
    with np.load(state / "site-0" / "canaries" / f"{run.run_id}.npz") as z:
        included = z["included"]
    assert len(included) == M and 0 < included.sum() < M
    own = load_dataset(state / "site-0" / "data.npz", "train")
    site0 = Site(SiteConfig.from_node_config({"partition-id": 0}, run))
    site1 = Site(SiteConfig.from_node_config({"partition-id": 1}, run))
    assert len(site0.train) == len(own) + included.sum()
    assert len(site1.train) == len(load_dataset(state / "site-1" / "data.npz", "train"))
    # which canaries were used never leaves the site's folder: the run folder holds counts only
    for f in run_dir.rglob("*"):
        assert not f.name.endswith(".npz")


def test_server_anchors_every_sites_ledger_head_under_secagg(canary_run):
    """Fit metrics reach the server under SecAgg+ (only arrays are masked): every site's head is recorded and is
    the sha256 of that site's charge line, computed here straight from the file's bytes."""
    run, run_dir = canary_run
    anchors = load_anchors(run_dir)
    assert sorted((a["site"], a["round"]) for a in anchors) == [("site-0", 1), ("site-1", 1)]
    for a in anchors:
        lines = (Path(run.state_dir) / a["site"] / "ledger.jsonl").read_text().splitlines()
        line = lines[a["seq"]]
        assert json.loads(line)["kind"] == "charge" and json.loads(line)["round"] == 1
        assert hashlib.sha256(line.encode()).hexdigest() == a["sha256"]


def test_ledger_rewritten_with_the_right_key_fails_only_the_anchored_audit(canary_run, copy_state, capsys):
    run, run_dir = canary_run
    state = copy_state(Path(run.state_dir), "rewritten")
    ledger = Ledger(state / "site-0" / "ledger.jsonl")
    entries = ledger.entries()
    # The key holder rewrites history (claims other weights left in round 1) and re-signs every entry.
    ledger.path.unlink()
    ledger.head_path.unlink()
    for e in entries:
        body = {k: v for k, v in e.items() if k not in RESERVED}
        if body["kind"] == "charge":
            body["weights_sha256"] = "0" * 64
        ledger.append(body)
    fp = fingerprint(load_public(ledger.pub_path))
    assert main(["audit", str(ledger.path), "--expect-key", fp]) == 0  # chain, signatures, head and ε all fine
    capsys.readouterr()
    assert main(["audit", str(ledger.path), "--expect-key", fp, "--anchors", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "anchor" in out and f"round 1 of run {run.run_id}" in out and "FAILED" in out
    # the untouched site still passes the anchored audit
    assert main(["audit", str(state / "site-1" / "ledger.jsonl"), "--anchors", str(run_dir)]) == 0


def test_bad_anchor_file_is_named(tmp_path):
    bad = tmp_path / "ledger-heads.json"
    bad.write_text(json.dumps({"anchors": [{"round": 1, "site": "site-0", "seq": -1, "sha256": "ab"}]}))
    with pytest.raises(ValueError, match=r"ledger-heads.json: anchors\[0\].*sha256"):
        load_anchors(tmp_path)
    with pytest.raises(FileNotFoundError, match="ledger-heads.json"):
        load_anchors(tmp_path / "nothing")
