"""FedAvg over the shared weights that only samples sites which said they can pay for the round.

Each evaluate round doubles as a roll call: sites report their privacy spend and whether they can afford the
next round (the site decides; see client/site.py). The server records refusals and stops when none is left.
"""
from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from fedsynth.config import RunConfig
from fedsynth.layout import names_sha256
from models import build_generator
from privacy.class_means import WIRE_NAMES

from .ledger_heads import heads_from_results
from .update_check import update_problem

log = logging.getLogger("fedsynth.server")


class FedSynthStrategy(FedAvg):
    def __init__(self, run: RunConfig, extra_config: dict[str, Any] | None = None):
        torch.manual_seed(run.seed)  # the initial global model is the same for a given seed
        self.model = build_generator(run.model, **run.model_kwargs())
        self.names = list(self.model.shared_weights().keys())
        self.run = run
        self.request = {**run.to_flower(), **(extra_config or {})}
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=1, min_evaluate_clients=run.sites,
            min_available_clients=run.sites,
            initial_parameters=ndarrays_to_parameters(list(self.model.shared_weights().values())),
            on_fit_config_fn=self._config, on_evaluate_config_fn=self._config)
        self.willing: set[int] = set()
        self.site_names: dict[int, str] = {}               # node id -> site name (from the roll call)
        self.current: list[np.ndarray] = []                # the global model this round started from
        self.sites: dict[str, dict[str, Any]] = {}       # latest public status per site
        self.refusals: list[dict[str, Any]] = []          # (round, site, reason)
        self.round_metrics: dict[int, dict[str, Any]] = {}
        self.secagg_note = ""                              # why SecAgg+ runs with its threshold (run summary)
        self.phase = "train"                               # "class-means" during round 0 (server/class_means.py)
        self.rollcall_failures = 0                         # sites that did not answer the last roll call

    def _config(self, server_round: int) -> dict[str, Any]:
        return {**self.request, "server-round": server_round}

    # --- roll call ------------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round, results, failures):
        self.willing = set()
        for proxy, res in results:
            m = dict(res.metrics)
            self.sites[str(m["site"])] = m
            self.site_names[proxy.node_id] = str(m["site"])
            if m.get("next-round-ok"):
                self.willing.add(proxy.node_id)
            elif server_round < self.run.rounds:
                self.refusals.append({"round": server_round + 1, "site": m["site"], "reason": m["next-round-reason"]})
                log.warning("%s refuses round %d: %s", m["site"], server_round + 1, m["next-round-reason"])
        self.rollcall_failures = len(failures)
        for failure in failures:
            log.warning("evaluate round %d: a site failed: %s", server_round, _reason(failure))
        entry = self.round_metrics.setdefault(server_round, {"round": server_round})
        entry["epsilon"] = {s: float(m["epsilon"]) for s, m in sorted(self.sites.items())}
        return None, {}

    def why_stop(self) -> str | None:
        """None if the next round can run, else the reason the run ends."""
        if not self.willing:
            reasons = "; ".join(r["reason"] for r in self.refusals[-len(self.sites):]) or "no site answered"
            return f"no site can take part in the next round ({reasons})"
        if self.request.get("secure") and len(self.willing) < 2:
            return "secure aggregation needs at least 2 sites, only 1 can take part"
        return None

    def site_of(self, node_id: int) -> str:
        return self.site_names.get(node_id, f"node {node_id}")

    def configure_fit(self, server_round, parameters, client_manager):
        """Sample ``fraction`` of the willing sites, by name and seeded by (seed, round): the same sites on
        every run of the same seed, resumed ones included (node ids change between runs, names don't)."""
        self.current = [np.asarray(a) for a in parameters_to_ndarrays(parameters)]
        proxies = {p.node_id: p for p in client_manager.all().values() if p.node_id in self.willing}
        names = sorted(proxies, key=self.site_of)
        k = min(len(names), max(2 if self.run.secure else 1, round(self.run.fraction * len(names))))
        if self.phase == "class-means":
            k = len(names)  # every willing site releases its class means once (fraction is for training rounds)
        chosen = sorted(random.Random(f"fedsynth-sample:{self.run.seed}:{server_round}").sample(names, k),
                        key=self.site_of)
        entry = self.round_metrics.setdefault(server_round, {"round": server_round})
        entry["sampled"] = [self.site_of(n) for n in chosen]
        ins = FitIns(parameters, self._config(server_round))
        return [(proxies[n], ins) for n in chosen]

    # --- aggregation ----------------------------------------------------------------------------
    def aggregate_fit(self, server_round, results, failures):
        entry = self.round_metrics.setdefault(server_round, {"round": server_round})
        entry["failures"] = sorted({_reason(f) for f in failures})  # SecAgg+ reports a failure once per stage
        for f in entry["failures"]:
            log.warning("round %d: a site's update failed: %s", server_round, f)
        answered = {str(res.metrics.get("site")) for _, res in results}
        entry["ledger-heads"] = heads_from_results(server_round, results)  # anchors (server/ledger_heads.py)
        entry["no-answer"] = [s for s in entry.get("sampled", []) if s not in answered
                              and not any(f"{s}:" in f for f in entry["failures"])]
        for s in entry["no-answer"]:
            log.warning("round %d: %s did not answer within %gs (straggler): its update is not used",
                        server_round, s, self.run.round_timeout)
        results = self._checked(server_round, results, entry)
        entry["sites"] = sorted(str(res.metrics.get("site")) for _, res in results)
        if not results:
            return None, {}
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return None, {}
        # float32 whatever the aggregation handed back (Flower's own SecAgg+ unmasking gives float64): a float64
        # global model would double every later message.
        arrays = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(params)]
        if self.run.secure:  # the server sees only the sum: check that (see server/update_check.py)
            problem = update_problem(arrays, self.current, self.max_norm())
            if problem:
                log.error("round %d: the secure aggregate is rejected (%s); keeping the previous global model",
                          server_round, problem)
                entry["rejected-aggregate"] = problem
                entry["sites"] = []
                return None, {}
        return ndarrays_to_parameters(arrays), metrics

    def secure_round_halted(self, server_round, stage, sampled, active, failures) -> None:
        """SecAgg+ stopped at ``stage`` (too few sites alive or in time): name who failed and who never answered."""
        entry = self.round_metrics.setdefault(server_round, {"round": server_round})
        entry["failures"] = sorted({_reason(f) for f in failures})
        missing = sorted(self.site_of(n) for n in set(sampled) - set(active))
        entry["no-answer"] = [s for s in missing if not any(f"{s}:" in f for f in entry["failures"])]
        entry["halted-at"] = stage
        for f in entry["failures"]:
            log.warning("round %d: a site failed: %s", server_round, f)
        log.error("round %d: secure aggregation halted at the %s stage: %d of %d sites alive, fewer than the "
                  "threshold (no answer in time: %s)", server_round, stage, len(active), len(sampled),
                  ", ".join(entry["no-answer"]) or "none")

    def _checked(self, server_round, results, entry):
        """Results whose updates may be averaged; each rejected one is logged and named in ``rejected``."""
        expected = names_sha256(WIRE_NAMES if self.phase == "class-means" else self.names)
        kept, rejected = [], []
        for proxy, res in results:
            site = str(res.metrics.get("site", self.site_of(proxy.node_id)))
            if self.run.secure:  # arrays are masked (summed later); only the public layout can be checked
                problem = update_problem(self.current, self.current, np.inf, res.metrics.get("names-sha256"),
                                         expected)
            else:
                try:
                    arrays = parameters_to_ndarrays(res.parameters)
                except Exception as exc:  # bytes that are not an ndarray
                    arrays, problem = None, f"unreadable arrays ({type(exc).__name__}: {exc})"
                if arrays is not None:
                    problem = update_problem(arrays, self.current, self.max_norm(),
                                             res.metrics.get("names-sha256"), expected)
            if problem:
                log.error("round %d: rejected the update of %s: %s (it left the site: it stays charged there)",
                          server_round, site, problem)
                rejected.append({"site": site, "reason": problem})
            else:
                kept.append((proxy, res))
        entry["rejected"] = rejected
        if self.run.secure and rejected:  # a bad update is inside the masked sum: the whole round is unusable
            log.error("round %d: an update inside the secure sum is bad; the round's aggregate is not used",
                      server_round)
            return []
        return kept

    def max_norm(self) -> float:
        """The bound on an update's change of the global model; a class-mean release is not a change of it."""
        return np.inf if self.phase == "class-means" else self.run.max_update_norm

    def weights(self, parameters: Parameters) -> "OrderedDict[str, np.ndarray]":
        arrays = parameters_to_ndarrays(parameters)
        return OrderedDict((n, np.asarray(a, dtype=np.float32)) for n, a in zip(self.names, arrays))


def _reason(failure) -> str:
    if isinstance(failure, BaseException):
        return _short(str(failure))
    _, res = failure
    return _short(getattr(res.status, "message", str(res)))


def _short(text: str) -> str:
    """The client's own message out of a Ray/Flower error (which wraps it in a whole remote traceback)."""
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
        text = text.split("\\'>", 1)[0].split("'>", 1)[0]
    return text.strip()
