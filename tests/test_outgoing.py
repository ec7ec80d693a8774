"""What leaves a hospital: every message a site sends during a real federation, SecAgg+ on and off.

A Flower client mod placed *outermost* in the sites' ClientApp (before ``secure_aggregation_mod``, so it sees
exactly what goes on the wire, masked vectors included) writes every reply to disk and returns it unchanged.
The Ray workers that run the sites are other processes, so the record is files, not a list in this process.

Allowed, and nothing else (README, *What leaves a site*):
- train replies, plain: one array record with exactly the model's shared weights (order, shapes, float32 — and
  the very bytes the site charged in its ledger), a weight of 1 and the documented fit metrics; in round 0, the
  class-mean release instead: one float32 vector of per-class sums and counts (privacy/class_means.py), the
  very bytes charged;
- train replies, SecAgg+: the protocol's config record — public keys, encrypted key shares, the masked
  integer vectors (one per shared array, plus SecAgg+'s weight factor), unmasking shares. The masked-vector
  reply is Flower's reply to the site's fit with its arrays emptied, so it also carries the fit metrics and
  the weight of 1 in clear (``secaggplus_mod`` keeps them): they must be the documented public facts;
- evaluate replies (the roll call): a loss of 0, a weight of 1, the documented public facts about the spend.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.client_app import client_fn, secure_aggregation_mod
from client.data import load_dataset
from models import build_generator
from privacy.class_means import wire_length
from privacy.ledger import Ledger, weights_sha256
from simulations.runner import simulate

SITES = ["site-0", "site-1"]
# Documented in README (*What leaves a site*): a key added there must be added here, and the other way round.
FIT_METRICS = {"site", "epsilon", "steps", "names-sha256", "ledger-seq", "ledger-head", "replayed"}
ROLL_CALL = {"site", "epsilon", "delta", "epsilon-budget", "unit", "accountant", "sigma", "clip", "sample-rate",
             "steps", "rounds", "rounds-this-run", "charged-rounds", "class-mean-releases", "next-round-ok",
             "next-round-reason"}
SECAGG_STAGES = [{Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}, {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
                 {Key.MASKED_PARAMETERS}, {Key.NODE_ID_LIST, Key.SHARE_LIST}]


def recording_mod(folder: str):
    """A client mod that only observes: it writes each outgoing reply to ``folder`` and returns it as it is."""
    def record_outgoing(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}"  # sorts in sending order (the stages are sequential)
        entry = {"type": reply.metadata.message_type, "site": f"site-{ctxt.node_config.get('partition-id')}",
                 "error": reply.error.reason if reply.has_error() else None, "arrays": {}, "metrics": {},
                 "configs": {}}
        arrays = {}
        if reply.has_content():
            for rname, record in reply.content.array_records.items():
                entry["arrays"][rname] = list(record.keys())
                for k, arr in record.items():
                    arrays[f"{rname}/{k}"] = arr.numpy()
            for rname, record in reply.content.metric_records.items():
                entry["metrics"][rname] = dict(record)
            for rname, record in reply.content.config_records.items():
                entry["configs"][rname] = {k: _jsonable(v) for k, v in record.items()}
        with open(Path(folder, name + ".npz"), "wb") as fh:
            np.savez(fh, **{k.replace("/", "|"): v for k, v in arrays.items()})
        Path(folder, name + ".json").write_text(json.dumps(entry))  # last: a .json means its .npz is whole
        return reply
    return record_outgoing


def _jsonable(value):
    """Config values as JSON: bytes as hex (a masked vector is bytes of a serialized integer array)."""
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def recorded(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.json")):
        entry = json.loads(f.read_text())
        with np.load(f.with_suffix(".npz"), allow_pickle=False) as z:
            entry["array_values"] = {k.replace("|", "/"): z[k] for k in z.files}
        out.append(entry)
    return out


@pytest.fixture(scope="module")
def federations(make_run, tmp_path_factory):
    """One tiny federation (round 0's class-mean release, then 1 round) with SecAgg+ and one without, each
    site's every reply recorded."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import this test module
    out = {}
    for secure in (True, False):
        folder = tmp_path_factory.mktemp(f"outgoing-{'secure' if secure else 'plain'}")
        app = ClientApp(client_fn=client_fn, mods=[recording_mod(str(folder)), secure_aggregation_mod])
        run = make_run(f"outgoing-{secure}", secure=secure, rounds=1, class_mean_share=0.2)
        simulate(run, client_app=app, reports=False)
        out[secure] = (run, recorded(folder))
    return out


def shared_shapes(run) -> list[tuple[int, ...]]:
    return [tuple(w.shape) for w in build_generator(run.model, **run.model_kwargs()).shared_weights().values()]


def release_shape(run) -> tuple[int]:
    return (wire_length(run.num_classes, run.channels * (run.resolution // run.coarse) ** 2),)


def check_nothing_image_like(entry, run, arrays=None) -> None:
    site_images = len(load_dataset(Path(run.state_dir) / entry["site"] / "data.npz", "train"))
    for key, a in (arrays or entry["array_values"]).items():
        assert a.shape[-2:] != (run.resolution, run.resolution), f"{key}: image-shaped {a.shape}"
        assert site_images not in a.shape, f"{key}: a dimension of {a.shape} is the site's image count"


def check_roll_call(entry) -> None:
    assert entry["arrays"] == {}, entry["arrays"]  # evaluate sends no weights back
    assert entry["metrics"] == {"evaluateres.loss": {"loss": 0.0}, "evaluateres.num_examples": {"num_examples": 1}}
    metrics = entry["configs"]["evaluateres.metrics"]
    assert set(metrics) <= ROLL_CALL, set(metrics) - ROLL_CALL
    assert {"site", "epsilon", "next-round-ok"} <= set(metrics)
    assert metrics["site"] == entry["site"]
    assert all(isinstance(v, (int, float, str, bool)) for v in metrics.values()), metrics  # no lists, no bytes
    assert set(entry["configs"]) == {"evaluateres.metrics", "evaluateres.status"}


def check_fit_metrics(entry) -> None:
    assert entry["metrics"] == {"fitres.num_examples": {"num_examples": 1}}  # uniform weight, not the site's size
    metrics = entry["configs"]["fitres.metrics"]
    assert set(metrics) <= FIT_METRICS, set(metrics) - FIT_METRICS
    assert metrics["site"] == entry["site"] and {"epsilon", "steps"} <= set(metrics)
    assert all(isinstance(v, (int, float, str, bool)) for v in metrics.values()), metrics
    assert entry["configs"]["fitres.status"]["code"] == 0


def test_plain_fedavg_sends_exactly_the_charged_shared_weights(federations):
    run, messages = federations[False]
    assert messages and all(m["error"] is None for m in messages)
    shapes = shared_shapes(run)
    fits = [m for m in messages if m["type"] == "train"]
    assert sorted(m["site"] for m in fits) == sorted(SITES * 2)  # round 0's release, then one update per site
    for m in messages:
        check_nothing_image_like(m, run)
        if m["type"] != "train":
            check_roll_call(m)
            continue
        assert list(m["arrays"]) == ["fitres.parameters"]
        sent = [m["array_values"][f"fitres.parameters/{k}"] for k in m["arrays"]["fitres.parameters"]]
        release, charge = charge_of(run, m, fits)
        assert [a.shape for a in sent] == ([release_shape(run)] if release else shapes)
        assert all(a.dtype == np.float32 for a in sent)
        # the very bytes the site charged for: the ledger's hash of the update equals the hash of what was sent
        assert charge["released"] == ("class-means" if release else "weights")
        assert charge["weights_sha256"] == weights_sha256(sent)
        assert set(m["configs"]) == {"fitres.metrics", "fitres.status"}
        check_fit_metrics(m)
    assert sum(m["type"] == "evaluate" for m in messages) == 3 * len(SITES)  # roll call before and after rounds 0, 1


def charge_of(run, message, fits) -> tuple[bool, dict]:
    """(whether ``message`` is the site's round-0 release, its ledger charge): the site's fits come in round order."""
    k = [m for m in fits if m["site"] == message["site"]].index(message)
    charges = Ledger(Path(run.state_dir) / message["site"] / "ledger.jsonl").charges()
    assert [c["round"] for c in charges] == [0, 1]
    return k == 0, charges[k]


def test_secagg_sends_only_masked_vectors_of_the_shared_weights(federations):
    run, messages = federations[True]
    assert messages and all(m["error"] is None for m in messages)
    shapes = shared_shapes(run)
    for site in SITES:
        fits = [m for m in messages if m["type"] == "train" and m["site"] == site]
        # the four SecAgg+ stages, in order, once for round 0's release and once for round 1: no plain weights
        assert [set(m["configs"].get(RECORD_KEY_CONFIGS, {})) for m in fits] == SECAGG_STAGES * 2
        for stages, sent_shapes in ((fits[:4], [release_shape(run)]), (fits[4:], shapes)):
            for m in stages[:2] + stages[3:]:
                assert m["arrays"] == {} and m["metrics"] == {} and list(m["configs"]) == [RECORD_KEY_CONFIGS]
            fit = stages[2]  # the fit reply itself, its arrays replaced by the masked vectors
            assert fit["arrays"] == {"fitres.parameters": []} and fit["array_values"] == {}
            check_fit_metrics(fit)
            masked = [bytes_to_ndarray(bytes.fromhex(b["bytes"]))
                      for b in fit["configs"][RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            # SecAgg+ puts its weight factor first, then one masked integer vector per array
            assert [a.shape for a in masked] == [(1,), *sent_shapes]
            assert sum(a.size for a in masked) == sum(int(np.prod(s)) for s in sent_shapes) + 1
            assert all(a.dtype.kind in "iu" for a in masked)
            check_nothing_image_like(fit, run, {f"masked/{i}": a for i, a in enumerate(masked)})
        charges = Ledger(Path(run.state_dir) / site / "ledger.jsonl").charges()
        assert [(c["round"], c["released"]) for c in charges] == [(0, "class-means"), (1, "weights")]
    for m in messages:
        if m["type"] == "evaluate":
            check_nothing_image_like(m, run)
            check_roll_call(m)


def test_secure_aggregate_is_the_mean_of_what_the_sites_charged(federations):
    """SecAgg+ changes who sees what, not the result: with it on, the global model of round 1 is the plain mean
    of the two sites' round-1 updates — each the very update its ledger charged, kept in its outbox
    (client/outbox.py) — up to SecAgg+'s quantization; with it off, exactly that mean. (Round 0's prior from
    the summed releases: tests/test_class_means.py.)"""
    from client.outbox import load_update, outbox_path
    from server.checkpoint import load_weights

    for secure, tolerance in ((True, 1e-4), (False, 1e-6)):
        run, _ = federations[secure]
        assert json.loads((run.run_dir / "config.json").read_text())["secure"] is secure
        assert ("on (SecAgg+)" if secure else "secure aggregation off") in (run.run_dir / "summary.txt").read_text()
        names = list(build_generator(run.model, **run.model_kwargs()).shared_weights())
        updates = []
        for site in SITES:
            ledger = Path(run.state_dir) / site / "ledger.jsonl"
            arrays, meta = load_update(outbox_path(ledger, run.run_id, 1))
            (charge,) = [c for c in Ledger(ledger).charges() if c["round"] == 1]
            assert charge["weights_sha256"] == meta["weights_sha256"] == weights_sha256(arrays)
            updates.append(dict(zip(names, arrays, strict=True)))
        global_1 = load_weights(run.run_dir / "checkpoints" / "round-001.safetensors")
        assert sorted(global_1) == sorted(names) and all(v.dtype == np.float32 for v in global_1.values())
        error = max(float(np.abs(global_1[k].astype(np.float64) - (updates[0][k].astype(np.float64) +
                                                                     updates[1][k]) / 2).max()) for k in names)
        assert error <= tolerance, (secure, error)
        spread = max(float(np.abs(updates[0][k] - updates[1][k]).max()) for k in names)
        assert spread > 100 * tolerance  # the sites' updates differ: the mean is a real test
