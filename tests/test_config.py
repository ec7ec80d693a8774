"""The one run configuration: Flower round-trip, validation, and the Flower app's defaults matching it."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsynth.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_flower_round_trip_keeps_every_field():
    run = RunConfig(run_id="x", rounds=7, epsilon=2.5, secure=False, partition="iid", data_path="/d.npz")
    assert RunConfig.from_flower(run.to_flower()) == run
    assert RunConfig.from_flower({**run.to_flower(), "server-round": 3}) == run  # Flower's own keys ignored


def test_pyproject_flower_defaults_are_the_run_config_defaults():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert RunConfig.from_flower(app["config"]) == RunConfig()
    assert set(app["config"]) == set(RunConfig().to_flower()) | {"resume"}  # resume: an action, not a setting
    assert app["config"]["resume"] is False
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}


@pytest.mark.parametrize("field, value, words", [
    ("rounds", 0, "rounds must be an integer ≥ 1"),
    ("delta", 1.5, "delta must be a number in (0, 1)"),
    ("sample_rate", 0.0, "sample-rate must be a number in (0, 1]"),
    ("accountant", "gdp", "accountant must be prv or rdp"),
    ("diversity", -0.5, "diversity must be a number ≥ 0"),
])
def test_bad_values_are_named(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        RunConfig(**{field: value})


def test_wrong_types_name_the_key_and_source():
    with pytest.raises(ValueError, match=r"server request: rounds must be int, got 'many'"):
        RunConfig.from_flower({"rounds": "many"}, source="server request")


def test_fractional_integers_are_rejected_not_truncated():
    with pytest.raises(ValueError, match=r"rounds must be int, got 2.7"):
        RunConfig.from_flower({"rounds": 2.7})
    assert RunConfig.from_flower({"rounds": 3.0}).rounds == 3


def test_the_gan_diversity_flag_reaches_the_model_every_site_builds():
    from fedsynth.cli import build_parser
    from models import build_generator
    args = build_parser().parse_args(["simulate", "--model", "gan", "--diversity", "0.25"])
    assert args.diversity == 0.25
    run = RunConfig(model="gan", diversity=args.diversity)
    assert RunConfig.from_flower(run.to_flower()).diversity == 0.25  # what the server sends each round
    assert build_generator("gan", **run.model_kwargs()).diversity == 0.25
    assert build_generator("gan", **RunConfig(model="gan").model_kwargs()).diversity == RunConfig().diversity
