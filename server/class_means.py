"""Round 0: the sites' class-mean releases, summed, become the model's class prior before round 1.

Every willing site sends its noisy per-class sums and counts (privacy/class_means.py) as one vector through the
same fit workflow as a training round, so under SecAgg+ the server sees only their sum. Sum / count per class
is each class's mean image, which the family takes as its prior (``Generator.set_class_means``); the global
model that round 1 starts from is that model, checkpointed as ``round-000`` (a resumed run does not ask twice).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from fedsynth.config import RunConfig
from privacy.class_means import from_wire, means_of, wire_length

from .strategy import FedSynthStrategy

log = logging.getLogger("fedsynth.server")


def release_dim(run: RunConfig) -> int:
    return run.channels * (run.resolution // run.coarse) ** 2


def class_mean_round(grid: Grid, legacy: LegacyContext, strategy: FedSynthStrategy,
                     fit_workflow: Callable[[Grid, LegacyContext], None]) -> "OrderedDict[str, np.ndarray]":
    """Run round 0 and return the global model round 1 starts from (the plain initial model if no release
    arrived); round 0's entry in ``strategy.round_metrics`` says what happened."""
    run, model = strategy.run, strategy.model
    initial = legacy.state.array_records[MAIN_PARAMS_RECORD]
    # The sites ignore this vector; it gives the release its shape on the wire (and SecAgg+ its layout).
    zeros = [np.zeros(wire_length(run.num_classes, release_dim(run)), np.float32)]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(zeros), True)
    strategy.phase = "class-means"
    try:
        fit_workflow(grid, legacy)
    finally:
        strategy.phase = "train"
    entry = strategy.round_metrics.setdefault(0, {"round": 0})
    entry["phase"] = "class-means"
    sites = entry.get("sites") or []
    if not sites:
        legacy.state.array_records[MAIN_PARAMS_RECORD] = initial
        entry["skipped"] = "no site's class-mean release arrived; round 1 starts from the plain initial model"
        log.warning("round 0: %s", entry["skipped"])
        return strategy.weights(compat.arrayrecord_to_parameters(initial, keep_input=True))
    mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))[0]
    sums, counts = from_wire(mean * len(sites), run.num_classes, release_dim(run))  # weight 1 each: mean × n
    side = run.resolution // run.coarse
    model.set_class_means(torch.as_tensor(means_of(sums, counts), dtype=torch.float32)
                          .view(run.num_classes, run.channels, side, side))
    weights = model.shared_weights()
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(list(weights.values())), True)
    entry["class-counts"] = [round(float(c), 1) for c in counts]  # noisy, post-processing: public
    log.info("round 0: class means from %s (noisy counts per class %s)", ",".join(sites), entry["class-counts"])
    return weights
