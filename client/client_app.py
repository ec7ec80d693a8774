"""The site's ClientApp: a legacy NumPyClient so SecAgg+ (``secaggplus_mod``) can wrap it.

What leaves the site: the model's shared weights (masked under SecAgg+), a weight of 1 (sites are averaged
uniformly: an exact example count would itself leak the site's size outside the DP mechanism), and public
metrics about its privacy spend. A refused round raises, so nothing but the reason leaves.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.app.message_type import MessageType
from flwr.common import Context
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedsynth.config import RunConfig
from fedsynth.layout import names_sha256
from privacy.ledger import entry_hash, weights_sha256

from .faults import DROPOUT, STRAGGLER, simulated_fault, straggler_delay
from .outbox import load_update, outbox_path, save_update
from .secagg_fast import fast_secaggplus_mod

# torch, Opacus and the models are imported where a message needs them, not here: Flower starts a fresh
# ClientApp process per message in a deployment, and three of SecAgg+'s four stages never train — importing
# torch + Opacus (≈4 s on 2 cores) for each of them made every secure round several times slower.

log = logging.getLogger("fedsynth.client")


class SiteClient(NumPyClient):
    def __init__(self, node_config: dict):
        self.node_config = dict(node_config)

    def _open(self, config: dict) -> tuple[RunConfig, "Site", int]:
        from .site import Site, SiteConfig
        run = RunConfig.from_flower(config, source="server request")
        site = Site(SiteConfig.from_node_config(self.node_config, run), run.resolution, run.num_classes)
        return run, site, int(config.get("server-round", 0))

    def _model(self, run: RunConfig, parameters: list[np.ndarray]):
        from models import build_generator
        model = build_generator(run.model, **run.model_kwargs())
        model.load_shared_weights(parameters)
        return model

    def fit(self, parameters, config):
        from .patient import train_private_patients
        from .site import RoundRefused
        from .trainer import cosine_lr, train_private
        run, site, rnd = self._open(config)
        try:
            plan = site.check_round(run, rnd)  # before any gradient is computed
        except RoundRefused as exc:
            site.refuse(run, rnd, str(exc), exc.rule)
            raise
        fault = simulated_fault(run.seed, rnd, site.config.name, run.dropout, run.straggler)
        if fault == DROPOUT:  # offline before training: nothing computed, nothing leaves, nothing charged
            raise RuntimeError(f"{site.config.name}: dropped out of round {rnd} (simulated, --dropout "
                               f"{run.dropout:g}) before training; nothing sent, nothing charged")
        input_sha256 = weights_sha256(parameters)
        if site.charge_for(run, rnd) is not None:
            return self._replay(run, site, rnd, input_sha256, fault)
        if rnd == 0:  # the class-mean release (privacy/class_means.py), not a training round
            weights, history, names, steps = self._class_means(run, site, plan)
        else:
            model = self._model(run, parameters)
            trainer = train_private_patients if plan["unit"] == "patient" else train_private  # see client/patient.py
            result = trainer(model, site.train, sigma=plan["sigma"], clip=plan["clip"],
                             sample_rate=plan["sample_rate"], steps=plan["steps_per_round"],
                             lr=cosine_lr(run.lr, run.lr_final, (rnd - 1) * plan["steps_per_round"],
                                          plan["rounds"] * plan["steps_per_round"]),
                             seed=run.seed * 100_003 + rnd * 101 + hash_name(site.config.name),
                             accountant=plan["accountant"], device=site.config.device)
            weights, history, steps = list(model.shared_weights().values()), result.history, result.steps
            names = names_sha256(model.shared_weights())
        failure = None
        if not all(np.isfinite(w).all() for w in weights):  # never send NaN weights
            failure = f"{site.config.name}: training produced non-finite weights; nothing sent"
        limit = float(config.get("secagg-clipping-range", np.inf))
        deltas = bool(config.get("secagg-deltas", False))  # SecAgg+ masks weights − global (client/secagg_fast.py)
        if failure is None and any(float(np.abs(w - p if deltas else w).max()) >= limit
                                   for w, p in zip(weights, parameters)):
            failure = (f"{site.config.name}: {'update − global model' if deltas else 'weights'} outside the SecAgg+ "
                       f"clipping range ±{limit:g}; nothing sent")
        if failure is None:  # kept before the charge, so a restarted server can get it again (client/outbox.py)
            save_update(outbox_path(site.config.ledger_path, run.run_id, rnd), weights, input_sha256)
        # Charge before anything leaves: the weights, or just the fact that the round failed, are both
        # post-processing of these DP steps, so the site pays for them either way; the ledger says which left.
        entry = site.charge(run, rnd, plan, history, weights_sha256=weights_sha256(weights),
                            released="failure-notice" if failure else ("class-means" if rnd == 0 else "weights"),
                            failure=failure)
        if failure:
            raise RuntimeError(failure)
        log.info("%s round %d: %d DP steps, σ=%.3f, ε=%.3f", site.config.name, rnd, steps, history[0][0],
                 entry["epsilon_after"])
        if fault == STRAGGLER:  # charged: the update does leave, only too late for the server to use it
            time.sleep(straggler_delay(run.round_timeout))
        seed_wire_rounding(run.seed, rnd, site.config.name)
        # Only public facts beside the weights: no loss or count computed from the private images.
        return weights, 1, {"site": site.config.name, "epsilon": entry["epsilon_after"], "steps": steps,
                            "names-sha256": names, **ledger_anchor(entry)}

    @staticmethod
    def _class_means(run: RunConfig, site: "Site", plan: dict):
        """Round 0: the site's noisy per-class sums and counts, one Gaussian mechanism with the plan's σ
        (privacy/class_means.py), as one float32 vector; charged as one step at q = 1."""
        from privacy.class_means import WIRE_NAMES, release
        spec = plan["class_means"]
        rng = np.random.default_rng(run.seed * 100_003 + hash_name(site.config.name))
        released = release(site.train.images, site.train.labels, run.num_classes, spec["sigma"], spec["coarse"],
                           spec["clip"], units=site.train.patient_ids, rng=rng, source=site.config.name)
        return [released.to_wire()], [(spec["sigma"], 1.0, 1)], names_sha256(WIRE_NAMES), 0

    def _replay(self, run: RunConfig, site: "Site", rnd: int, input_sha256: str, fault: str | None):
        """Round ``rnd`` was charged already (the server restarted): re-send that very update, or refuse."""
        from models import build_generator
        from .site import RoundRefused
        kept = load_update(outbox_path(site.config.ledger_path, run.run_id, rnd))
        if kept is None or kept[1].get("input_sha256") != input_sha256 or not site.replayable(run, rnd):
            raise RoundRefused(f"{site.config.name}: round {rnd} of {run.run_id} was already charged and its "
                               "update can't be re-sent for these global weights; nothing new sent", "already-charged")
        weights = kept[0]
        log.info("%s round %d: re-sending the update already charged (server restarted)", site.config.name, rnd)
        if fault == STRAGGLER:
            time.sleep(straggler_delay(run.round_timeout))
        if rnd == 0:
            from privacy.class_means import WIRE_NAMES
            names = WIRE_NAMES
        else:
            names = build_generator(run.model, **run.model_kwargs()).shared_weights()
        seed_wire_rounding(run.seed, rnd, site.config.name)
        return weights, 1, {"site": site.config.name, "epsilon": float(site.charge_for(run, rnd)["epsilon_after"]),
                            "steps": int(site.charge_for(run, rnd)["steps"]) if rnd else 0, "replayed": True,
                            "names-sha256": names_sha256(names), **ledger_anchor(site.charge_for(run, rnd))}

    def evaluate(self, parameters, config):
        """The roll call: this site's privacy spend and whether it can pay for the next round.

        No loss on the site's images leaves (it would be a non-private statistic of them); the reported
        loss is 0 and the weight 1.
        """
        from .site import RoundRefused
        run, site, rnd = self._open(config)
        next_round = rnd + 1
        ok, reason = True, ""
        if next_round <= run.rounds:
            try:
                site.check_round(run, next_round)
            except RoundRefused as exc:
                ok, reason = False, str(exc)
                site.refuse(run, next_round, reason, exc.rule)
        return 0.0, 1, {**site.status(run), "next-round-ok": ok, "next-round-reason": reason}


def ledger_anchor(charge: dict) -> dict:
    """The head of the site's ledger right after this round's charge (its seq and sha256), for the server to
    record: a ledger rewritten later, even re-signed with the site's own key, no longer holds that hash
    (`fedsynth audit --anchors`). A hash of the site's own ledger entry says nothing about its images."""
    return {"ledger-seq": int(charge["seq"]), "ledger-head": entry_hash(charge)}


def seed_wire_rounding(seed: int, rnd: int, name: str) -> None:
    """Flower's SecAgg+ mod quantizes the update with stochastic rounding drawn from numpy's *global* RNG,
    right after fit returns, in this process. Seeding it per (run seed, round, site) makes a seeded run, and
    an update re-sent after a server restart, aggregate to the same bits. The rounding is not a privacy
    mechanism (the DP noise was added during training; the masks use their own generators)."""
    np.random.seed((seed * 100_003 + rnd * 101 + hash_name(name)) % 2**32)


def hash_name(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))  # stable across processes, unlike hash()


def client_fn(context: Context):
    import torch
    torch.set_num_threads(1)  # one thread per simulated site; the machine's cores are shared
    return SiteClient(context.node_config).to_client()


def secure_aggregation_mod(msg, ctxt, call_next):
    """SecAgg+ when the server runs it; plain FedAvg messages pass straight through (one code path)."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    return fast_secaggplus_mod(msg, ctxt, call_next)  # Flower's secaggplus_mod, faster masking (secagg_fast.py)


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
