"""``fedsynth evaluate`` on a real tiny run folder: one tiny federation (2 sites, 1 round) per session."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsynth.cli import main
from simulations.report import evaluate

FEDSYNTH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fedsynth"
SECTIONS = ["run", "evaluation", "privacy", "fidelity", "utility", "memorization", "membership-inference", "agreement"]


@pytest.fixture(scope="module")
def tiny_run(first_run):
    return first_run  # tests/conftest.py: 2 sites, 2 SecAgg+ rounds; simulate() ends by writing the release report


def statistics(node, path=""):
    """Every {"value": ...} in the report, with where it sits."""
    if isinstance(node, dict):
        if "value" in node:
            yield path, node
        for key, child in node.items():
            yield from statistics(child, f"{path}/{key}")


def copy_run(run_dir: Path, tmp_path: Path, **config_changes) -> Path:
    dest = tmp_path / "run-copy"
    shutil.copytree(run_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    return dest


def test_simulation_writes_the_release_report(tiny_run):
    run, run_dir = tiny_run
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report) == sorted(report) and set(SECTIONS) <= set(report)
    ev = report["evaluation"]
    assert ev["n-synthetic"] == 600 and ev["real-reference-split"] == "val" and ev["n-real-reference"] == 100
    assert ev["seed"] == run.seed

    stats = dict(statistics(report))
    assert len(stats) >= 25
    for where, s in stats.items():
        counts = [k for k in s if k == "n" or k.startswith("n-")]
        assert counts, f"{where} has no sample count"
        assert "ci95" in s and s["ci95"][0] <= s["ci95"][1], where
    f = report["fidelity"]
    assert f["fid"]["n-a"] == 600 and f["fid"]["n-b"] == 100 and f["real-floor"]["fid"]["n-a"] == 50
    assert f["kid"]["std"] >= 0 and set(f["per-class"]) == {"0", "1"}
    assert f["fid"]["value"] > f["real-floor"]["fid"]["value"]  # two tiny rounds of DP training are far from real

    u = report["utility"]
    assert (u["recipe"]["epochs"], u["recipe"]["centred"]) == (5, True) and u["tstr"]["n-train"] == u["trtr"]["n-train"] == 600
    assert u["trtr"]["auc"]["value"] > 0.7  # a real-data classifier does learn on these 600 images
    assert u["recipe"]["seeds"] == 3
    for row in ("tstr", "trtr", "noise-control"):  # each figure: the mean over the same 3 classifier seeds
        r = u[row]
        assert r["n-seeds"] == r["auc"]["n-seeds"] == r["balanced-accuracy"]["n-seeds"] == 3, row
        assert [s["seed"] for s in r["per-seed"]] == [3 * run.seed + k for k in range(3)], row
        for figure in ("auc", "accuracy", "balanced-accuracy"):
            assert r[figure]["value"] == pytest.approx(np.mean([s[figure] for s in r["per-seed"]])), (row, figure)

    mem, mia = report["memorization"], report["membership-inference"]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert report["privacy"]["per-site"] == privacy
    assert report["privacy"]["max-epsilon"] == max(p["epsilon"] for p in privacy.values())
    holdout = sum(len(np.load(Path(run.state_dir) / f"site-{k}" / "data.npz")["val_labels"]) for k in range(2))
    assert mem["n-members"] == mem["n-nonmembers"] == mia["n-members"] == mia["n-nonmembers"] == holdout
    assert mem["pixel"]["closer-to-training"]["n-synthetic"] == 600
    assert "auc" in mia["black-box"] and "auc" in mia["white-box"]  # the VAE has a loss: white-box runs
    assert list(report["agreement"]["over-rounds"]["per-round"]) == [str(r) for r in range(1, run.rounds + 1)]
    assert report["agreement"]["final"] == json.loads((run_dir / "agreement.json").read_text())

    summary = (run_dir / "summary.txt").read_text()
    assert "release report (report.html, report.json)" in summary and "mean over 3 classifier seeds" in summary


def test_html_is_self_contained_with_every_section(tiny_run):
    _, run_dir = tiny_run
    page = (run_dir / "report.html").read_text()
    for section in ["summary", "privacy", "fidelity", "utility", "memorization", "membership-inference",
                    "agreement", "pictures"]:
        assert f'id="{section}"' in page, section
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page), "the page links outside itself"
    per_seed = json.loads((run_dir / "report.json").read_text())["utility"]["noise-control"]["per-seed"]
    assert "AUC per seed" in page and ", ".join(f"{s['auc']:.3f}" for s in per_seed) in page
    assert "n-seeds=3" in page and "S seeds" in page
    images = dict(re.findall(r"alt='([^']+)' src='data:image/png;base64,([^']+)'", page))
    assert set(images) == {"samples", "real-vs-synthetic", "rounds", "closest-pairs"}
    for name, data in images.items():
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width >= 200, name
            assert np.asarray(im.convert("L")).std() > 1.0, f"{name} is blank"


def test_cli_evaluate_is_deterministic_and_writes_where_asked(tiny_run, tmp_path, capsys):
    _, run_dir = tiny_run
    for out in ("a", "b"):
        assert main(["evaluate", str(run_dir), "--n", "100", "--out", str(tmp_path / out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "TSTR AUC" in printed and f"wrote {tmp_path / 'b' / 'report.json'}" in printed
    a, b = ((tmp_path / x / "report.json").read_bytes() for x in "ab")
    assert a == b
    report = json.loads(a)
    assert report["evaluation"]["n-synthetic"] == 100 and report["evaluation"]["seed"] == 3
    assert report["utility"]["trtr"]["n-train"] == 100
    assert json.loads((run_dir / "report.json").read_bytes())["evaluation"]["n-synthetic"] == 600  # untouched


def test_without_site_folders_the_attacks_are_skipped_with_the_reason(tiny_run, tmp_path):
    run, run_dir = tiny_run
    state = tmp_path / "elsewhere"
    state.mkdir()
    for cached in Path(run.state_dir).glob("classifier-*.safetensors"):  # the data's reference classifier
        shutil.copy(cached, state / cached.name)
    copy = copy_run(run_dir, tmp_path, **{"state-dir": str(state)})
    report = evaluate(copy, n=100)
    for section in ("memorization", "membership-inference"):
        assert "site-0/data.npz: missing" in report[section]["skipped"]
    assert "skipped" in (copy / "report.html").read_text() and "auc" in report["utility"]["tstr"]


def test_bad_inputs_name_the_file(tiny_run, tmp_path, capsys):
    run, run_dir = tiny_run

    def error(*args) -> str:
        assert main(["evaluate", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'nope'}: run folder does not exist" in error(tmp_path / "nope")
    assert f"{tmp_path / 'none.npz'}: file does not exist" in error(run_dir, "--data", tmp_path / "none.npz")
    assert "n (synthetic images) must be ≥ 10 per class" in error(run_dir, "--n", 5)

    moved = copy_run(run_dir, tmp_path, **{"data-path": str(tmp_path / "moved.npz")})
    msg = error(moved)
    assert "config.json: data-path" in msg and "--data" in msg

    only_train = tmp_path / "train-only.npz"
    with np.load(run.data_path) as z:
        np.savez(only_train, train_images=z["train_images"], train_labels=z["train_labels"])
    assert f"{only_train}: no test_images/test_labels" in error(run_dir, "--data", only_train)

    (moved / "privacy.json").unlink()
    assert "privacy.json: missing" in error(moved, "--data", run.data_path)


def test_cli_entry_point_exits_2_naming_the_folder(tmp_path):
    proc = subprocess.run([str(FEDSYNTH), "evaluate", str(tmp_path / "missing-run")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "missing-run: run folder does not exist" in proc.stderr, proc.stderr


def test_a_run_that_never_trained_still_gets_a_report(tiny_run, tmp_path):
    """Every site refused (see test_federation's `refused`): the initial model (constant grey images), no
    checkpoints, no completed round. The report must still be written, and say that nothing was learned."""
    from models import build_generator
    from server.checkpoint import save_weights

    run, run_dir = tiny_run
    copy = copy_run(run_dir, tmp_path)
    save_weights(copy / "weights.safetensors", build_generator(run.model, **run.model_kwargs()).shared_weights())
    shutil.rmtree(copy / "checkpoints")
    (copy / "metrics.json").write_text(json.dumps({"rounds": [{"round": 0, "epsilon": {"site-0": 0.0}}]}))
    report = evaluate(copy, n=100)
    assert report["agreement"]["over-rounds"]["per-round"] == {}
    assert report["fidelity"]["precision-recall"]["recall"]["value"] == 0.0  # one grey image covers nothing
    assert report["utility"]["tstr"]["balanced-accuracy"]["value"] == pytest.approx(0.5, abs=0.05)
    assert (copy / "report.html").stat().st_size > 10_000


def test_the_release_table_refuses_a_run_that_did_not_complete(tmp_path):
    """A run that stopped early (here: Ray killed a site's worker for memory, SecAgg+ lost the round) spent less ε
    and trained less than its row would claim: the benchmark table must not tabulate it."""
    from simulations.bench_release_table import check_complete
    run_dir = tmp_path / "table" / "diffusion-seed0" / "runs" / "diffusion-seed0"
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.json"
    metrics.write_text(json.dumps({"rounds": [], "charged-not-used": {}, "stop-reason": None}))
    check_complete(run_dir)
    metrics.write_text(json.dumps({"rounds": [], "charged-not-used": {"site-0": [7]},
                                   "stop-reason": "secure aggregation needs at least 2 sites, only 1 can take part"}))
    with pytest.raises(RuntimeError, match=r"did not complete .*only 1 can take part.*site-0.*remove .*diffusion-seed0"):
        check_complete(run_dir)
    metrics.write_text(json.dumps({"rounds": [], "charged-not-used": {"site-1": [3]}, "stop-reason": None}))
    with pytest.raises(RuntimeError, match="charged but not used: {'site-1': \\[3\\]}"):
        check_complete(run_dir)
