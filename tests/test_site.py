"""The site's own rules, checked without a federation: budget caps, one plan per run, refusals, split pinning."""
from __future__ import annotations

import json

import pytest

from client.data import load_dataset
from client.site import RoundRefused, Site, SiteConfig
from privacy.accountant import epsilon
from simulations.runner import prepare_sites


@pytest.fixture()
def site_dir(make_run, tmp_path):
    run = make_run("site-rules", state_dir=tmp_path / "state")
    prepare_sites(run)
    return run, tmp_path / "state" / "site-0"


def test_site_policy_caps_the_servers_request(site_dir):
    run, folder = site_dir
    node = {"data-path": str(folder / "data.npz"), "site-name": "h1", "max-epsilon": 1.5}
    site = Site(SiteConfig.from_node_config(node, run.replace(epsilon=10.0)), num_classes=2)
    assert site.budget(run.replace(epsilon=10.0)) == (1.5, run.delta)
    plan = site.plan(run.replace(epsilon=10.0))
    total = epsilon([(plan["sigma"], plan["sample_rate"], plan["steps_per_round"] * plan["rounds"])], run.delta)
    assert plan["epsilon_budget"] == 1.5 and 1.4 < total <= 1.5


def test_plan_is_made_once_per_run_and_rounds_are_checked(site_dir):
    run, folder = site_dir
    site = Site(SiteConfig.from_node_config({"partition-id": 0}, run), num_classes=2)
    plan = site.check_round(run, 1)
    assert site.plan(run) == plan  # the recorded plan, not a re-calibration
    assert [e["kind"] for e in site.ledger.entries()] == ["plan"]
    site.charge(run, 1, plan, [(plan["sigma"], plan["sample_rate"], plan["steps_per_round"])])
    with pytest.raises(RoundRefused, match="already charged"):
        site.check_round(run, 1)
    with pytest.raises(RoundRefused, match="past the 2 rounds"):
        site.check_round(run, 3)
    with pytest.raises(RuntimeError, match="not the plan"):
        site.charge(run, 2, plan, [(plan["sigma"] / 2, plan["sample_rate"], plan["steps_per_round"])])


def test_exhausted_budget_is_refused_before_training(site_dir):
    run, folder = site_dir
    site = Site(SiteConfig.from_node_config({"partition-id": 1}, run), num_classes=2)
    # Another run already spent almost everything.
    site.ledger.append({"kind": "charge", "run_id": "earlier", "round": 1, "sigma": 0.6, "clip": 1.0,
                        "sample_rate": 0.1, "steps": 200, "delta": run.delta, "accountant": "prv",
                        "unit": "image", "epsilon_after": 0.0})
    assert site.ledger.epsilon(run.delta) > run.epsilon
    with pytest.raises(RoundRefused, match="budget"):
        site.check_round(run, 1)
    assert site.ledger.plan(run.run_id) is None


def test_a_state_folder_keeps_its_split(site_dir):
    run, folder = site_dir
    before = (folder / "data.npz").read_bytes()
    prepare_sites(run)  # same settings: accepted, data untouched
    assert (folder / "data.npz").read_bytes() == before
    with pytest.raises(ValueError, match=r"partition.json.*\['partition'\]"):
        prepare_sites(run.replace(partition="iid"))
    assert json.loads((folder.parent / "partition.json").read_text())["partition"] == run.partition
    assert len(load_dataset(folder / "data.npz", "train", num_classes=2)) > 0


def test_site_without_data_keys_is_a_clear_error(make_run):
    run = make_run("no-keys")
    with pytest.raises(ValueError, match="data-path.*partition-id"):
        SiteConfig.from_node_config({"something": 1}, run)
