"""FedAvg over the shared weights that only samples sites which said they can pay for the round.

Each evaluate round doubles as a roll call: sites report their privacy spend and whether they can afford the
next round (the site decides; see client/site.py). The server records refusals and stops when none is left.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from fedsynth.config import RunConfig
from models import build_generator

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
        self.sites: dict[str, dict[str, Any]] = {}       # latest public status per site
        self.refusals: list[dict[str, Any]] = []          # (round, site, reason)
        self.round_metrics: dict[int, dict[str, Any]] = {}

    def _config(self, server_round: int) -> dict[str, Any]:
        return {**self.request, "server-round": server_round}

    # --- roll call ------------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round, results, failures):
        self.willing = set()
        for proxy, res in results:
            m = dict(res.metrics)
            self.sites[str(m["site"])] = m
            if m.get("next-round-ok"):
                self.willing.add(proxy.node_id)
            elif server_round < self.run.rounds:
                self.refusals.append({"round": server_round + 1, "site": m["site"], "reason": m["next-round-reason"]})
                log.warning("%s refuses round %d: %s", m["site"], server_round + 1, m["next-round-reason"])
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

    def configure_fit(self, server_round, parameters, client_manager):
        chosen = super().configure_fit(server_round, parameters, client_manager)
        return [(proxy, ins) for proxy, ins in chosen if proxy.node_id in self.willing]

    # --- aggregation ----------------------------------------------------------------------------
    def aggregate_fit(self, server_round, results, failures):
        entry = self.round_metrics.setdefault(server_round, {"round": server_round})
        entry["sites"] = sorted(str(res.metrics.get("site")) for _, res in results)
        entry["failures"] = [_reason(f) for f in failures]
        for f in failures:
            log.warning("round %d: a site's update failed: %s", server_round, _reason(f))
        if not results:
            return None, {}
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return None, {}
        # SecAgg+ dequantizes to float64: back to float32 or every later message doubles in size.
        arrays = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(params)]
        if not all(np.isfinite(a).all() for a in arrays):
            log.error("round %d: aggregate is not finite; keeping the previous global model", server_round)
            return None, {}
        return ndarrays_to_parameters(arrays), metrics

    def weights(self, parameters: Parameters) -> "OrderedDict[str, np.ndarray]":
        arrays = parameters_to_ndarrays(parameters)
        return OrderedDict((n, np.asarray(a, dtype=np.float32)) for n, a in zip(self.names, arrays))


def _reason(failure) -> str:
    if isinstance(failure, BaseException):
        return str(failure)
    _, res = failure
    return getattr(res.status, "message", str(res))
