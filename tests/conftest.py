"""Shared tiny settings for tests that run real federations (Flower Simulation Engine + Ray, Opacus, SecAgg+).

Everything is kept small so a whole simulation takes tens of seconds on two shared cores: a stratified
600-image subset of the bundled PneumoniaMNIST (plus a 100-image val split), 2 sites, 2 rounds of
2 DP steps each (local_epochs 0.2 at q = 0.1).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from client.data import ImageDataset, load_dataset, save_npz
from fedsynth.config import DEFAULT_DATA, RunConfig

SMALL_TRAIN, SMALL_VAL = 600, 100

# The settings every tiny federation shares (a test overrides what it is about).
# class_mean_share 0: the round-0 release has tests of its own (tests/test_class_means.py); the rest stay one round shorter.
TINY = dict(sites=2, rounds=2, local_epochs=0.2, sample_rate=0.1, epsilon=3.0, delta=1e-5, seed=0, class_mean_share=0.0)


def stratified(ds: ImageDataset, n: int, rng: np.random.Generator) -> ImageDataset:
    """``n`` images drawn without replacement, keeping each class's share of ``ds``."""
    idx = []
    for c in range(len(ds.classes)):
        members = np.flatnonzero(ds.labels == c)
        idx.extend(rng.choice(members, round(n * len(members) / len(ds)), replace=False))
    return ds.subset(np.sort(np.asarray(idx)))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A MedMNIST-style .npz: a random stratified subset of the bundled train split plus a small val split."""
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("data") / "pneumonia-small.npz"
    train, val = load_dataset(DEFAULT_DATA, "train"), load_dataset(DEFAULT_DATA, "val")
    save_npz(path, stratified(train, SMALL_TRAIN, rng), stratified(val, SMALL_VAL, rng))
    back = load_dataset(path, "train")
    assert len(back) == SMALL_TRAIN and set(np.unique(back.labels)) == {0, 1}
    return path


@pytest.fixture(scope="session")
def classifier_cache(small_data, tmp_path_factory) -> Path:
    """The runner's reference classifier for the small data, trained once per session (not once per state dir).

    ``simulations.runner.reference_classifier`` caches it as STATE_DIR/classifier-KEY.safetensors; every state
    folder a test makes gets a copy, so each run skips retraining it.
    """
    from simulations.runner import reference_classifier

    cache = tmp_path_factory.mktemp("classifier")
    reference_classifier(load_dataset(small_data, "train"), cache)
    (file,) = cache.glob("classifier-*.safetensors")
    return file


@pytest.fixture(scope="session")
def make_run(small_data, classifier_cache, tmp_path_factory):
    """``make_run(name, state_dir=None, **changes) -> RunConfig``: tiny settings, fresh folders from tmp_path_factory.

    ``state_dir`` given: reuse (or create) that state folder, so the sites' ledgers carry over.
    """
    def make(name: str, state_dir: Path | None = None, **changes) -> RunConfig:
        root = tmp_path_factory.mktemp(name)
        state = Path(state_dir) if state_dir is not None else root / "state"
        state.mkdir(parents=True, exist_ok=True)
        if not (state / classifier_cache.name).exists():
            shutil.copy(classifier_cache, state / classifier_cache.name)
        settings = dict(TINY, run_id=name, data_path=str(small_data), state_dir=str(state),
                        out_dir=str(root / "runs"))
        return RunConfig(**{**settings, **changes})

    return make


@pytest.fixture(scope="session")
def copy_state(tmp_path_factory):
    """``copy_state(state_dir, name) -> Path``: a copy of a state folder (site data, ledgers, classifier cache)."""
    def copy(state_dir: Path, name: str) -> Path:
        dest = tmp_path_factory.mktemp(name) / "state"
        shutil.copytree(state_dir, dest)
        return dest

    return copy


@pytest.fixture(scope="session")
def run_tiny_family(make_run):
    """``run_tiny_family(family)``: see ``_run_tiny_family``."""
    return lambda family: _run_tiny_family(make_run, family)


def _run_tiny_family(make_run, family: str):
    """A 2-site, 1-round SecAgg+ federation of ``family`` with its own learning rates, no reports; checks what
    every family's run folder must hold and returns (run, run_dir, privacy)."""
    import json

    from models import FAMILIES
    from simulations.runner import simulate

    lr, lr_final = FAMILIES[family].default_lr
    run = make_run(f"{family}-fed", model=family, rounds=1, secure=True, lr=lr, lr_final=lr_final)
    run_dir = simulate(run, reports=False)  # the reports are the same code for every family (tests/test_report.py)
    for name in ("weights.safetensors", "samples.png", "privacy.json", "summary.txt",
                 "checkpoints/round-001.safetensors"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["model"] == family
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["sites"] for r in metrics["rounds"] if r.get("sites")] == [["site-0", "site-1"]]
    assert "on (SecAgg+)" in (run_dir / "summary.txt").read_text()
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site in ("site-0", "site-1"):
        assert 0 < privacy[site]["epsilon"] <= run.epsilon + 1e-9
    return run, run_dir, privacy


@pytest.fixture(scope="session")
def first_run(make_run):
    """The suite's one end-to-end federation with every report: SecAgg+ on, budget ε=3, fresh state, 2 rounds,
    then the class agreement and the release report. tests/test_federation.py checks its run folder and
    ledgers (and copies its state to run again on top of it); tests/test_report.py checks its report."""
    from simulations.runner import simulate

    run = make_run("first", secure=True, epsilon=3.0)
    return run, simulate(run)  # returns normally; every file of the run folder must be there


@pytest.fixture(scope="session")
def secure_reference_run(make_run):
    """One uninterrupted 2-site SecAgg+ federation with the class-mean release (round 0) and 2 rounds, no
    reports: the reference of tests/test_resume.py and the federation of tests/test_class_means.py."""
    from simulations.runner import simulate

    run = make_run("resume-ref", run_id="r", rounds=2, secure=True, class_mean_share=0.2)
    return run, simulate(run, reports=False)
