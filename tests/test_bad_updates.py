"""Bad updates through the real engine: the server (the system under test) must reject and name them.

The sites run the project's own ClientApp code (``SiteClient``: real Opacus training, real ledger charges);
a test-only subclass then corrupts what five of them send, the way a buggy or hostile site would, *after*
the site's own checks. Plain FedAvg, where the server sees each update; under SecAgg+ it sees only the sum,
so there the test checks the aggregate is rejected as a whole.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import ray.cloudpickle
import torch
from flwr.client import ClientApp

from client.client_app import SiteClient, secure_aggregation_mod
from client.site import Site, SiteConfig
from privacy.ledger import Ledger
from server.checkpoint import load_weights
from simulations.runner import prepare_sites, simulate

# Ray ships the ClientApp to its workers by pickling: this module isn't importable there, so send it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CORRUPT = {"site-0": "nan", "site-1": "inf", "site-2": "shape", "site-3": "names", "site-4": "norm"}
REASON = {"nan": "non-finite", "inf": "non-finite", "shape": "wrong shape", "names": "wrong names",
          "norm": "update norm"}


class CorruptingSite(SiteClient):
    def fit(self, parameters, config):
        weights, n, metrics = super().fit(parameters, config)
        kind = CORRUPT.get(str(metrics["site"])) if config.get("run-id") != "secure-bad" else \
            ("norm" if metrics["site"] == "site-0" else None)
        weights = [np.array(w, copy=True) for w in weights]
        if kind == "nan":
            weights[0].flat[0] = np.nan
        elif kind == "inf":
            weights[-1].flat[0] = np.inf
        elif kind == "shape":
            weights[1] = weights[1][..., :-1]
        elif kind == "names":
            metrics = {**metrics, "names-sha256": "0" * 64}
        elif kind == "norm":
            weights = [w + 5.0 for w in weights]  # inside SecAgg+'s ±8 range, far from the global model
        return weights, n, metrics


def corrupting_client_fn(context):
    torch.set_num_threads(1)
    return CorruptingSite(context.node_config).to_client()


corrupting_app = ClientApp(client_fn=corrupting_client_fn, mods=[secure_aggregation_mod])


@pytest.fixture(scope="module")
def plain_bad(make_run):
    run = make_run("plain-bad", sites=6, rounds=1, secure=False, partition="iid", max_update_norm=50.0)
    return run, simulate(run, client_app=corrupting_app, reports=False)


def test_each_kind_of_bad_update_is_rejected_and_named(plain_bad):
    run, run_dir = plain_bad
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (r1,) = [r for r in metrics["rounds"] if r["round"] == 1]
    rejected = {x["site"]: x["reason"] for x in r1["rejected"]}
    assert sorted(rejected) == sorted(CORRUPT)
    for site, kind in CORRUPT.items():
        assert REASON[kind] in rejected[site], (site, rejected[site])
    assert r1["sites"] == ["site-5"]  # only the good update is averaged
    summary = (run_dir / "summary.txt").read_text()
    for site in CORRUPT:
        assert f"rejected the update of {site}" in summary
        assert f"charged but not used: {site} rounds [1]" in summary  # it left the site: charged, and shown
    assert metrics["charged-not-used"] == {site: [1] for site in CORRUPT}


def test_global_model_stays_finite_and_is_the_good_sites_update(plain_bad):
    run, run_dir = plain_bad
    final = load_weights(run_dir / "weights.safetensors")
    assert all(np.isfinite(a).all() for a in final.values())
    good = Ledger(f"{run.state_dir}/site-5/ledger.jsonl").charges()[-1]["weights_sha256"]
    from privacy.ledger import weights_sha256
    from server.strategy import FedSynthStrategy
    names = FedSynthStrategy(run).names  # the order the site sent its arrays in
    assert weights_sha256([final[k] for k in names]) == good  # FedAvg of the one good update is that update


def test_a_bad_update_inside_the_secure_sum_rejects_the_round(make_run):
    run = make_run("secure-bad", run_id="secure-bad", sites=2, rounds=1, secure=True, max_update_norm=50.0)
    run_dir = simulate(run, client_app=corrupting_app, reports=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (r1,) = [r for r in metrics["rounds"] if r["round"] == 1]
    assert "update norm" in r1["rejected-aggregate"] and r1["sites"] == []
    assert "the aggregate was rejected" in r1["skipped"]
    from server.strategy import FedSynthStrategy
    initial = FedSynthStrategy(run).model.shared_weights()
    final = load_weights(run_dir / "weights.safetensors")
    for k, v in initial.items():  # the previous (initial) global model is kept
        np.testing.assert_array_equal(final[k], v)


def test_a_site_never_sends_non_finite_weights(make_run):
    """Training from NaN global weights gives NaN weights: the site reports a failure and sends nothing."""
    run = make_run("nan-site", sites=2, rounds=1)
    prepare_sites(run)
    from server.strategy import FedSynthStrategy
    params = [np.full_like(a, np.nan) for a in FedSynthStrategy(run).model.shared_weights().values()]
    client = SiteClient({"partition-id": 0})
    with pytest.raises(RuntimeError, match="non-finite weights; nothing sent"):
        client.fit(params, {**run.to_flower(), "server-round": 1})
    site = Site(SiteConfig.from_node_config({"partition-id": 0}, run))
    (charge,) = site.ledger.charges()
    assert charge["released"] == "failure-notice" and charge["weights_sha256"] is None  # charged: the failure left
