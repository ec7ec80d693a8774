"""A real deployment on localhost: `fedsynth server` (flower-superlink with TLS and SuperNode authentication)
and three `fedsynth client` hospitals (flower-supernode, each with its own port, data file, ledger and node
key) run the class-mean release (round 0) and two SecAgg+ rounds — with the whole coordinator SIGKILLed after
round 1 and resumed; a SuperNode with an unregistered key is refused; one without the CA can't connect. Every
process runs in its own process group and is killed in teardown, pass or fail.

Slow by nature: each Flower message to a node starts a ClientApp process that imports torch and Opacus
(≈3.5 s of CPU each), and a SecAgg+ round is five messages per node. One run serves every test here (it was
two: one plain, one killed and resumed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from client.data import load_dataset, save_npz
from fedsynth.certs import make_certs
from fedsynth.processes import child_env, descendant_groups, flower_tool, free_port, start_group, stop_group

from conftest import TINY  # pytest puts tests/ on sys.path (rootdir conftest)

HOSPITALS = ("site-0", "site-1", "site-2")
RUN_TIMEOUT = 480  # seconds; a healthy run takes a fraction of it


def fedsynth(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsynth", *args]


def split_sites(small_data: Path, root: Path) -> list[Path]:
    """The small data split into one MedMNIST-style file per hospital (disjoint images)."""
    train, val = load_dataset(small_data, "train"), load_dataset(small_data, "val")
    files = []
    for k, (tr, va) in enumerate(zip(np.array_split(np.arange(len(train)), 3), np.array_split(np.arange(len(val)), 3))):
        files.append(root / f"hospital-{k}" / "images.npz")
        files[-1].parent.mkdir(parents=True)
        save_npz(files[-1], train.subset(tr), val.subset(va))
    return files


@pytest.fixture(scope="module")
def deployment(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    make_certs(certs, ["localhost"], ["127.0.0.1"], [*HOSPITALS, "intruder"])
    data = split_sites(small_data, root)
    port = free_port()
    env = child_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    logs = {}

    def launch(name: str, cmd: list[str]) -> subprocess.Popen:
        logs[name] = root / f"{name}.log"
        with open(logs[name], "wb") as log:
            procs.append(start_group(cmd, log, env=env, cwd=root))
        return procs[-1]

    state = root / "state"  # the ledgers, laid out as `fedsynth audit STATE` reads them
    try:
        register = [a for h in HOSPITALS for a in ("--register", str(certs / "hospitals" / h / "node.pub"))]
        server = launch("server", fedsynth(
            "server", "--certs", str(certs), *register,
            "--host", "127.0.0.1", "--port", str(port), "--rounds", "2", "--run-id", "deployed",
            "--out", str(root / "runs"), "--local-epochs", str(TINY["local_epochs"]),
            "--sample-rate", str(TINY["sample_rate"]), "--epsilon", str(TINY["epsilon"]),
            "--delta", str(TINY["delta"]), "--seed", str(TINY["seed"])))
        _wait_for(lambda: "registered site-2" in logs["server"].read_text(), 90, server, logs["server"])
        for k, h in enumerate(HOSPITALS):
            launch(h, fedsynth("client", "--data", str(data[k]), "--site-name", h,
                               "--ledger", str(state / h / "ledger.jsonl"), "--superlink", f"127.0.0.1:{port}",
                               "--ca", str(certs / "ca.crt"), "--node-key", str(certs / "hospitals" / h / "node.key"),
                               "--port", str(free_port())))
        # While the federation runs: an unregistered key, and a node without the CA (system trust store only).
        intruder_key = certs / "hospitals" / "intruder" / "node.key"
        intruder = launch("intruder", [flower_tool("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                       "--root-certificates", str(certs / "ca.crt"),
                                       "--auth-supernode-private-key", str(intruder_key),
                                       "--node-config", f'data-path="{data[0]}"', "--port", str(free_port()),
                                       "--max-wait-time", "20"])
        no_ca = launch("no-ca", [flower_tool("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                 "--auth-supernode-private-key", str(certs / "hospitals" / "site-0" / "node.key"),
                                 "--node-config", f'data-path="{data[0]}"', "--port", str(free_port()),
                                 "--max-wait-time", "20"])
        # Once round 1 is checkpointed and a hospital was charged for round 2: SIGKILL the whole coordinator
        # (fedsynth server, its SuperLink, flwr run, the ServerApp) — nothing of it gets to clean up — then
        # `fedsynth server --resume RUN_DIR` on the same port, with the hospitals' SuperNodes still up.
        run_dir = root / "runs" / "deployed"
        _wait_for(lambda: (run_dir / "checkpoints" / "round-001.json").exists()
                  and any((2, "weights") in _charges(state, h, "deployed") for h in HOSPITALS),
                  RUN_TIMEOUT, server, logs["server"])
        for pgid in [server.pid, *descendant_groups(server.pid)]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.wait(30)
        killed_early = not (run_dir / "summary.txt").exists()
        server_args = ["--certs", str(certs), *register, "--host", "127.0.0.1", "--port", str(port)]
        resumed = launch("server-resumed", fedsynth("server", *server_args, "--resume", str(run_dir)))
        outsiders = {"intruder": _wait(intruder, 120), "no-ca": _wait(no_ca, 120)}
        server_rc = _wait(resumed, RUN_TIMEOUT)
        yield SimpleNamespace(root=root, state=state, logs=logs, server_rc=server_rc, outsiders=outsiders,
                              run_dir=run_dir, killed_early=killed_early)
    finally:
        for proc in reversed(procs):
            stop_group(proc, grace=25)


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _wait_for(condition, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting; {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_three_hospitals_two_secure_rounds_over_tls(deployment):
    log = deployment.logs["server-resumed"].read_text()
    assert deployment.server_rc == 0, log[-4000:]
    run_dir = deployment.run_dir
    for name in ("weights.safetensors", "config.json", "metrics.json", "privacy.json", "summary.txt", "samples.png",
                 "checkpoints/round-001.safetensors", "checkpoints/round-002.safetensors"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {r["round"]: r.get("sites") for r in metrics["rounds"] if r["round"] > 0} == {1: list(HOSPITALS),
                                                                                           2: list(HOSPITALS)}
    assert "on (SecAgg+)" in (run_dir / "summary.txt").read_text()
    assert "round 2/2 done" in log and "SuperLink stopped" in log  # the ServerApp's own lines, streamed
    assert metrics["rounds"][0]["phase"] == "class-means" and metrics["rounds"][0]["sites"] == list(HOSPITALS)
    for h in HOSPITALS:  # Flower's secaggplus_mod at each node: a masked vector left once per round, round 0 too,
        # and once more where a round-2 update charged before the kill was re-sent to the resumed server (the
        # ClientApp's own lines don't reach the node's log to say which; each round is charged once: below)
        assert deployment.logs[h].read_text().count("uploading masked parameters") in (3, 4), h
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for h in HOSPITALS:
        ledger = [json.loads(line) for line in (deployment.state / h / "ledger.jsonl").read_text().splitlines()]
        charges = [e for e in ledger if e["kind"] == "charge"]
        # the CLI's default class-mean-share: round 0 released the class means, one step at q = 1
        assert [(c["run_id"], c["round"], c["released"]) for c in charges] == [
            ("deployed", 0, "class-means"), ("deployed", 1, "weights"), ("deployed", 2, "weights")]
        assert (charges[0]["sample_rate"], charges[0]["steps"]) == (1.0, 1)
        assert privacy[h]["rounds"] == 2 and privacy[h]["epsilon"] == pytest.approx(charges[-1]["epsilon_after"])
        assert 0 < charges[-1]["epsilon_after"] <= TINY["epsilon"]
    # Each ledger verifies (chain, signatures, head), its ε recomputes, and it still holds the heads the server
    # recorded during the run — by the audit command.
    audit = subprocess.run(fedsynth("audit", str(deployment.state), "--anchors", str(run_dir)), capture_output=True,
                           text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert all(h in audit.stdout for h in HOSPITALS)


def test_unregistered_node_is_refused(deployment):
    log = deployment.logs["intruder"].read_text()
    assert deployment.outsiders["intruder"] not in (0, None), log
    assert "Failed to activate SuperNode" in log
    # The SuperLink says why: it has no SuperNode registered under this public key.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key((deployment.root / "certs" / "hospitals" / "intruder" / "node.pub")
                                            .read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    superlink_log = (deployment.root / "runs" / ".flwr" / "superlink.log").read_text()
    refusals = [line for line in superlink_log.splitlines() if "No SuperNode found with the given public key" in line]
    assert refusals and all(pem.splitlines()[1] in line for line in refusals)
    # It never took part: the run's sites are the three registered hospitals only.
    metrics = json.loads((deployment.run_dir / "metrics.json").read_text())
    assert {s for r in metrics["rounds"] for s in r.get("sites", [])} == set(HOSPITALS)


def test_node_without_the_ca_cannot_connect(deployment):
    log = deployment.logs["no-ca"].read_text()
    assert deployment.outsiders["no-ca"] not in (0, None), log
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_client_refuses_bad_data_before_starting_anything(tmp_path):
    bad = tmp_path / "scan.npz"
    bad.write_bytes(b"not a zip archive")
    make_certs(tmp_path / "certs", ["localhost"], [], ["h"])
    flwr_home = tmp_path / "flwr"
    res = subprocess.run(fedsynth("client", "--data", str(bad), "--superlink", "127.0.0.1:9", "--ca",
                                  str(tmp_path / "certs" / "ca.crt"), "--node-key",
                                  str(tmp_path / "certs" / "hospitals" / "h" / "node.key"),
                                  "--flwr-home", str(flwr_home)), capture_output=True, text=True)
    assert res.returncode == 2 and str(bad) in res.stderr, res.stderr
    assert "flower-supernode" not in res.stdout and not flwr_home.exists()  # nothing started, nothing written


def test_flwr_cli_reaches_the_superlink_under_a_name_its_certificate_covers(tmp_path):
    from cryptography import x509

    from fedsynth.coordinator import control_address

    def cert(dns, ips):
        root = tmp_path / "-".join(dns + ips)
        make_certs(root, dns, ips, [])
        return x509.load_pem_x509_certificate((root / "superlink" / "server.crt").read_bytes())

    both = cert(["fl.example.org"], ["127.0.0.1"])
    assert control_address("0.0.0.0", 9092, both) == "127.0.0.1:9092"  # listening everywhere: loopback works
    assert control_address("fl.example.org", 9092, both) == "fl.example.org:9092"
    public_only = cert(["fl.example.org"], ["203.0.113.5"])
    assert control_address("0.0.0.0", 9092, public_only) == "fl.example.org:9092"  # TLS would refuse 127.0.0.1
    assert control_address("::", 7, cert([], ["::1"])) == "[::1]:7"


def test_run_config_carries_only_keys_the_app_declares(tmp_path):
    from fedsynth.config import RunConfig
    from fedsynth.coordinator import app_run_config

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.flwr.app]\npublisher = "x"\n[tool.flwr.app.config]\nrounds = 20\nmodel = "vae"\n')
    assert app_run_config(RunConfig(rounds=3, model="gan"), pyproject) == {"rounds": 3, "model": "gan"}
    with pytest.raises(ValueError, match=r"pyproject.toml.*does not declare \['epsilon'\]"):
        app_run_config(RunConfig(epsilon=2.0), pyproject)


def _charged_site(root: Path, small_data: Path, steps: int) -> tuple[Path, Path]:
    """A hospital folder whose ledger already holds one charge of ``steps`` DP steps (σ = 1, q = 0.1)."""
    from privacy.ledger import MECHANISM, Ledger

    ledger = Ledger(root / "ledger.jsonl")
    ledger.append({"kind": "charge", "run_id": "earlier", "round": 1, "mechanism": MECHANISM, "sigma": 1.0,
                   "clip": 1.0, "sample_rate": 0.1, "steps": steps, "delta": 1e-5, "accountant": "prv",
                   "unit": "image", "epsilon_after": 0.0, "released": "weights", "weights_sha256": "0" * 64,
                   "site": "h"})
    return small_data, ledger.path


def test_client_dry_run_reports_the_budget_left_and_refuses_what_it_cannot_meet(small_data, tmp_path, capsys):
    from opacus.accountants import PRVAccountant

    from fedsynth.cli import main

    data, ledger = _charged_site(tmp_path, small_data, steps=20)
    prv = PRVAccountant()  # Opacus' own accountant on the recorded mechanism, not fedsynth's wrapper
    prv.history = [(1.0, 0.1, 20)]
    spent = prv.get_epsilon(delta=1e-5)
    assert 0.5 < spent < 8
    base = ["client", "--data", str(data), "--ledger", str(ledger), "--dry-run"]
    assert main(base + ["--max-epsilon", "8"]) == 0
    out = capsys.readouterr().out
    assert f"ε = {spent:.3f} at δ = 1e-05" in out and f"budget left ε = {8 - spent:.3f} of max-epsilon = 8" in out
    assert "600 training images" in out
    assert ("  device      cuda (device auto)" if torch.cuda.is_available() else "  device      cpu (device auto)") in out
    # A GPU this hospital does not have: refused in the dry run, not in round 1.
    assert main(base + ["--device", f"cuda:{torch.cuda.device_count()}"]) == 2
    assert "node config: device is 'cuda:" in capsys.readouterr().err
    # A budget already spent, an unknown model family: an error naming the rule, exit 2.
    assert main(base + ["--max-epsilon", f"{spent / 2:g}"]) == 2
    assert "max-epsilon" in capsys.readouterr().err
    assert main(base + ["--allowed-models", "vae,transformer"]) == 2
    assert "allowed-models names unknown families ['transformer']" in capsys.readouterr().err
    # A ledger edited by hand does not verify: the site refuses to train on it.
    ledger.write_text(ledger.read_text().replace('"steps":20', '"steps":2'))
    assert main(base) == 2
    assert f"{ledger} does not verify" in capsys.readouterr().err


def _charges(state: Path, site: str, run_id: str) -> list[tuple[int, str]]:
    path = state / site / "ledger.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(e["round"], e["released"]) for e in entries if e["kind"] == "charge" and e["run_id"] == run_id]


def test_server_killed_after_round_one_resumes_without_losing_or_doubling_a_charge(deployment):
    """The coordinator was SIGKILLed once round 1 was checkpointed and a hospital was charged for round 2, and
    `fedsynth server --resume RUN_DIR` finished the run with the hospitals' SuperNodes still up: every hospital
    holds exactly one charge per round (a round-2 update already charged is re-sent from the hospital's outbox,
    not trained and charged again)."""
    d = deployment
    assert d.killed_early  # killed before the end of the run
    log = d.logs["server-resumed"].read_text()
    assert d.server_rc == 0, log[-4000:]
    assert "resumes after round 1" in log
    metrics = json.loads((d.run_dir / "metrics.json").read_text())
    assert {r["round"]: r.get("sites") for r in metrics["rounds"] if r["round"] > 0} == {1: list(HOSPITALS),
                                                                                           2: list(HOSPITALS)}
    for h in HOSPITALS:
        assert _charges(d.state, h, "deployed") == [(0, "class-means"), (1, "weights"), (2, "weights")], h
