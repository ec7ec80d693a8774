"""Kill a real simulation (SIGKILL, whole process tree: server, Ray, sites) after round 1, resume it, and compare
with an uninterrupted run of the same seed and settings (2 sites, the class-mean release of round 0, 2 rounds,
SecAgg+).

What must match exactly: the rounds (3, each with both sites), each site's charges as (round, steps, σ, q,
ε after) — none lost, none doubled, one plan per site with the same σ.
Close, not equal: the final global weights. SecAgg+ quantizes each update with Flower's stochastic rounding
(unseeded ``np.random``, ±8 in 2**22 steps ≈ 3.8e-6), so even two uninterrupted runs differ by a few steps;
compared to 1e-4. What may differ freely: times, signatures, the hashes chaining entries that carry times.

The kill lands as soon as round 1's checkpoint exists and a site has been charged for round 2 — typically
before round 2's aggregate reaches its checkpoint, the case where a charge was written but never used by a
checkpoint: the resumed server asks for round 2 again and the site re-sends the update it already paid for
(client/outbox.py) instead of being charged twice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from privacy.ledger import Ledger
from server.checkpoint import load_weights

SITES = ["site-0", "site-1"]
DRIVER = """
import json, sys
from fedsynth.config import RunConfig
from simulations.runner import resume_simulation, simulate
if sys.argv[1] == "run":
    simulate(RunConfig(**json.loads(sys.argv[2])), reports=False)
else:
    resume_simulation(sys.argv[2], reports=False)
"""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so the whole tree this test started can be killed at once."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def charges(run, site):
    return [e for e in Ledger(Path(run.state_dir) / site / "ledger.jsonl").entries() if e["kind"] == "charge"]


def summary(run, site):
    return [(c["round"], c["steps"], c["sigma"], c["sample_rate"], c["epsilon_after"]) for c in charges(run, site)]


def plans(run, site):
    return [e for e in Ledger(Path(run.state_dir) / site / "ledger.jsonl").entries() if e["kind"] == "plan"]


@pytest.fixture(scope="module")
def reference(secure_reference_run):
    return secure_reference_run


@pytest.fixture(scope="module")
def resumed(make_run):
    run = make_run("resume-kill", run_id="r", rounds=2, secure=True, class_mean_share=0.2)
    settings = {k: v for k, v in json.loads(run.to_json()).items()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(Path(run.out_dir).parent / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "run", json.dumps(settings)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ckpt = run.run_dir / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (ckpt / "round-001.json").exists() and any(c["round"] == 2 for s in SITES for c in _safe(run, s)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed; see {log.name}"
        tree = [proc.pid] + descendants(proc.pid)
        for pid in tree:  # SIGKILL everything the run started: nothing gets to clean up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = {"round-2-checkpointed": (ckpt / "round-002.json").exists(),
                 "charged-round-2": [s for s in SITES if any(c["round"] == 2 for c in _safe(run, s))]}
    assert not (run.run_dir / "weights.safetensors").exists()  # it really was cut short
    time.sleep(1.0)  # let the killed processes' ports and files go
    out = subprocess.run([sys.executable, "-c", DRIVER, "resume", str(run.run_dir)], capture_output=True,
                         text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run, run.run_dir, killed_at


def _safe(run, site):
    try:
        return charges(run, site)
    except Exception:  # read while being written by the run under test: try again
        return []


def test_resumed_run_has_the_same_rounds(reference, resumed):
    (_, ref_dir), (_, run_dir, killed_at) = reference, resumed
    ref = json.loads((ref_dir / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    assert [(r["round"], r.get("sites")) for r in got["rounds"]] == \
        [(r["round"], r.get("sites")) for r in ref["rounds"]] == [(k, SITES) for k in (0, 1, 2)], killed_at
    assert got["rounds"][0]["phase"] == "class-means"
    assert got["charged-not-used"] == {} and got["stop-reason"] is None


def test_resumed_ledgers_match_the_uninterrupted_run(reference, resumed):
    (ref_run, _), (run, _, killed_at) = reference, resumed
    for site in SITES:
        assert summary(run, site) == summary(ref_run, site), (site, killed_at)
        assert [c["round"] for c in charges(run, site)] == [0, 1, 2]  # none lost, none doubled, one release
        assert len(plans(run, site)) == 1 and plans(run, site)[0]["sigma"] == plans(ref_run, site)[0]["sigma"]
        assert Ledger(Path(run.state_dir) / site / "ledger.jsonl").verify()["ok"]
    privacy = json.loads((run.run_dir / "privacy.json").read_text())
    ref_privacy = json.loads((ref_run.run_dir / "privacy.json").read_text())
    for site in SITES:
        assert privacy[site]["epsilon"] == ref_privacy[site]["epsilon"]
        assert privacy[site]["steps"] == ref_privacy[site]["steps"]


def test_resumed_weights_match_the_uninterrupted_run(reference, resumed):
    (_, ref_dir), (_, run_dir, _) = reference, resumed
    a, b = load_weights(ref_dir / "weights.safetensors"), load_weights(run_dir / "weights.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.isfinite(b[k]).all()
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_a_charged_round_is_re_sent_not_charged_again(make_run):
    """What a resumed server relies on, without the race: the site's real fit, asked twice for round 1 with the
    same global weights, sends the same update once charged; other weights get a refusal and no new charge."""
    from client.client_app import SiteClient
    from client.site import RoundRefused
    from server.strategy import FedSynthStrategy
    from simulations.runner import prepare_sites

    run = make_run("replay", rounds=2)
    prepare_sites(run)
    params = list(FedSynthStrategy(run).model.shared_weights().values())
    config = {**run.to_flower(), "server-round": 1, "secagg-clipping-range": 8.0}
    client = SiteClient({"partition-id": 0})
    first, _, m1 = client.fit(params, config)
    again, _, m2 = client.fit(params, config)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and m2["replayed"] is True
    assert [c["round"] for c in charges(run, "site-0")] == [1] and m2["epsilon"] == m1["epsilon"]
    with pytest.raises(RoundRefused, match="already charged"):
        client.fit([p + 0.01 for p in params], config)
    assert [c["round"] for c in charges(run, "site-0")] == [1]
    (Path(run.state_dir) / "site-0" / "outbox").rename(Path(run.state_dir) / "site-0" / "lost")
    with pytest.raises(RoundRefused, match="already charged"):  # no outbox: refused, still charged once
        client.fit(params, config)
    assert [c["round"] for c in charges(run, "site-0")] == [1]
