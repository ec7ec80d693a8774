"""Fuzzing (hypothesis): malformed data files, ledgers, configs, CLI flags and checkpoints get the project's
clear errors (naming the file and the line or field), never a raw traceback of another type, and never
change an existing ledger. Kept small (max_examples, no deadline) so the whole file runs in seconds.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from client.data import DataError, load_dataset
from fedsynth.cli import main as cli_main
from fedsynth.config import RunConfig
from privacy.ledger import Ledger, LedgerError
from server.checkpoint import save_checkpoint
from server.resume import CheckpointError, last_checkpoint, run_config

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.bool_, np.complex64])


def scratch(tmp_path: Path, name: str) -> Path:
    """A fresh folder per hypothesis example (tmp_path is shared by all examples of one test)."""
    d = tmp_path / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


# --- data loaders -------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300))
def test_npz_of_random_bytes_is_a_data_error_naming_the_file(tmp_path, blob):
    path = scratch(tmp_path, "raw") / "site.npz"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=str(path)):
        load_dataset(path)


@FUZZ
@given(images=arrays(DTYPES, array_shapes(min_dims=0, max_dims=5, max_side=5)),
       labels=arrays(DTYPES, array_shapes(min_dims=0, max_dims=3, max_side=6)),
       keys=st.sampled_from([("train_images", "train_labels"), ("train_images", "labels"), ("x", "y")]))
def test_npz_with_odd_arrays_loads_or_names_the_file(tmp_path, images, labels, keys):
    path = scratch(tmp_path, "arr") / "site.npz"
    np.savez(path, **{keys[0]: images, keys[1]: labels})
    try:
        ds = load_dataset(path, resolution=8)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert len(ds) == len(ds.labels) > 0 and ds.images.shape[-1] == 8  # what loaded is well-formed


@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([".png", ".jpg", ".jpeg"]),
                                st.binary(max_size=200)), min_size=1, max_size=4))
def test_image_folder_with_corrupt_files_is_a_data_error(tmp_path, files):
    root = scratch(tmp_path, "folder")
    for i, (cls, suffix, blob) in enumerate(files):
        (root / cls).mkdir(exist_ok=True)
        (root / cls / f"img{i}{suffix}").write_bytes(blob)
    with pytest.raises(DataError, match=str(root)):
        load_dataset(root, resolution=8)


# --- the ledger parser and verifier ----------------------------------------------------------------------
def _valid_ledger(folder: Path) -> Ledger:
    ledger = Ledger(folder / "ledger.jsonl")
    ledger.append({"kind": "plan", "run_id": "r", "sigma": 1.0, "clip": 1.0, "sample_rate": 0.1,
                   "steps_per_round": 2, "rounds": 2, "delta": 1e-5})
    ledger.append({"kind": "charge", "run_id": "r", "round": 1, "mechanism": "subsampled-gaussian", "sigma": 1.0,
                   "clip": 1.0, "sample_rate": 0.1, "steps": 2, "delta": 1e-5, "accountant": "prv",
                   "unit": "image", "epsilon_after": 0.5, "released": "weights", "weights_sha256": "0" * 64})
    return ledger


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                       max_leaves=8)


@FUZZ
@given(lines=st.lists(st.text(max_size=60) | JSONISH.map(json.dumps) |
                      st.fixed_dictionaries({"kind": st.sampled_from(["plan", "charge", "refusal"])},
                                            optional={k: JSONISH for k in ("sigma", "steps", "seq", "v", "prev",
                                                                            "pub", "sig", "round", "run_id")}
                                            ).map(json.dumps), max_size=5))
def test_malformed_ledger_lines_give_ledger_errors_and_appends_change_nothing(tmp_path, lines):
    folder = scratch(tmp_path, "ledger")
    ledger = _valid_ledger(folder)
    text = ledger.path.read_text() + "\n".join(lines) + ("\n" if lines else "")
    ledger.path.write_text(text)
    try:
        result = ledger.verify()
    except LedgerError as exc:
        assert str(ledger.path) in str(exc)
    else:
        assert isinstance(result["ok"], bool)
        for p in result["problems"]:
            assert str(ledger.path) in p["where"]
    before = ledger.path.read_bytes()
    try:
        ledger.append({"kind": "refusal", "run_id": "r", "round": 2, "reason": "fuzz", "rule": "test"})
    except LedgerError as exc:
        assert str(ledger.path) in str(exc)
        assert ledger.path.read_bytes() == before  # a ledger the site can't extend is left exactly as it was
    else:
        assert ledger.path.read_bytes().startswith(before.rstrip(b"\n"))  # appended, nothing rewritten


@FUZZ
@given(pos=st.integers(min_value=0), char=st.characters(blacklist_categories=("Cs",)))
def test_an_edited_character_is_caught_or_a_clear_error(tmp_path, pos, char):
    folder = scratch(tmp_path, "edit")
    ledger = _valid_ledger(folder)
    text = ledger.path.read_text()
    i = pos % len(text)
    if text[i] == char:
        return
    ledger.path.write_text(text[:i] + char + text[i + 1:])
    try:
        result = ledger.verify()
    except LedgerError as exc:
        assert str(ledger.path) in str(exc)
        return
    assert not result["ok"] or text[i] in " \n" and char.isspace()  # only whitespace around lines is harmless


# --- configs, CLI flags, checkpoints --------------------------------------------------------------------
@FUZZ
@given(st.dictionaries(st.sampled_from(["rounds", "sites", "epsilon", "delta", "sample-rate", "dropout",
                                        "straggler", "fraction", "round-timeout", "secure", "model"]),
                       JSONISH, min_size=1, max_size=4))
def test_malformed_run_config_names_the_field(values):
    try:
        RunConfig.from_flower(values, source="run config")
    except ValueError as exc:
        assert any(k in str(exc) for k in values), str(exc)


BAD_FLAGS = {"--dropout": ["-1", "1.5", "nan", "abc"], "--straggler": ["-0.1", "1", "inf", "x"],
             "--fraction": ["0", "-1", "1.5", "nan", "abc"], "--round-timeout": ["0", "-1", "nan", "abc"],
             "--sites": ["0", "-2", "abc", "1.5"], "--max-update-norm": ["0", "-3", "nan"]}


@FUZZ
@given(st.sampled_from([(f, v) for f, vs in BAD_FLAGS.items() for v in vs]))
def test_bad_cli_values_exit_2_naming_the_flag(capsys, flag_value):
    flag, value = flag_value
    try:
        code = cli_main(["simulate", flag, value])  # the config is checked before anything runs
    except SystemExit as exc:  # argparse: not a number at all
        code = exc.code
    assert code == 2
    assert flag.lstrip("-") in capsys.readouterr().err


@FUZZ
@given(meta=st.binary(max_size=120) | JSONISH.map(lambda v: json.dumps(v).encode()),
       weights=st.binary(max_size=120) | st.none())
def test_malformed_checkpoints_give_checkpoint_errors(tmp_path, meta, weights):
    run_dir = scratch(tmp_path, "run")
    run = RunConfig(run_id="r", rounds=3, out_dir=str(tmp_path))
    from server.strategy import FedSynthStrategy
    reference = FedSynthStrategy(run).model.shared_weights() if not hasattr(
        test_malformed_checkpoints_give_checkpoint_errors, "ref") else test_malformed_checkpoints_give_checkpoint_errors.ref
    test_malformed_checkpoints_give_checkpoint_errors.ref = reference
    save_checkpoint(run_dir, 1, reference, {"run_id": "r", "rounds": [], "refusals": []})
    (run_dir / "checkpoints" / "round-002.json").write_bytes(meta)
    if weights is not None:
        (run_dir / "checkpoints" / "round-002.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError, match="round-002"):
        last_checkpoint(run_dir, run, reference)
    (run_dir / "config.json").write_bytes(meta)
    try:
        run_config(run_dir)
    except CheckpointError as exc:
        assert "config.json" in str(exc)


def test_resume_of_a_folder_that_is_not_a_run_is_a_clear_cli_error(tmp_path, capsys):
    assert cli_main(["simulate", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'}: missing" in capsys.readouterr().err
