"""Flower's SecAggPlusWorkflow, reporting to the strategy when a round halts (which stage, who was missing).

Flower 1.42's workflow just logs "Secure aggregation halted." and returns when too few sites stay alive (or
answer before the stage timeout), so ``aggregate_fit`` never runs and nobody learns which site failed or
timed out. This runs the same four stages and, on a halt, hands the protocol state to
``strategy.secure_round_halted`` so the run's metrics name the failed sites and the stragglers.

Its unmask stage is Flower's, message for message, with the arithmetic of ``server/secagg_unmask.py`` (flat
uint32 masks, float32 result; the same numbers as Flower's float64 aggregate cast to float32). With
``deltas=True`` the sites mask (update − global model) (``client/secagg_fast.py``, fit config
``secagg-deltas``) and the global model is added back to the unmasked mean here, before the strategy sees it.
"""
from __future__ import annotations

import logging
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SaKey
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from .secagg_unmask import unmasked_average

log = logging.getLogger("fedsynth.server")


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    def __init__(self, *args, deltas: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.modulus_range > 2 ** 32:
            raise ValueError(f"modulus_range must be ≤ 2**32 (uint32 unmasking), got {self.modulus_range}")
        self.deltas = deltas

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        state = WorkflowState()
        rnd = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage,
                     self.unmask_stage):
            if not step(grid, context, state):
                context.strategy.secure_round_halted(rnd, step.__name__.removesuffix("_stage").replace("_", " "),
                                                     state.sampled_node_ids, state.active_node_ids, state.failures)
                return
        float32_global_model(context)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower 1.42's ``unmask_stage`` (same messages, same checks, same masks removed), with the
        arithmetic of :func:`server.secagg_unmask.unmasked_average`."""
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        current_round = cast(int, cfg[Key.CURRENT_ROUND])
        active_nids = state.active_node_ids
        dead_nids = state.sampled_node_ids - active_nids

        def make(nid: int) -> Message:
            neighbours = state.nid_to_neighbours[nid]
            cfg_record = ConfigRecord({SaKey.STAGE: Stage.UNMASK,
                                       SaKey.ACTIVE_NODE_ID_LIST: list(neighbours & active_nids),
                                       SaKey.DEAD_NODE_ID_LIST: list(neighbours & dead_nids)})
            return Message(content=RecordDict({RECORD_KEY_CONFIGS: cfg_record}), dst_node_id=nid,
                           message_type=MessageType.TRAIN, group_id=str(current_round))

        msgs = grid.send_and_receive([make(nid) for nid in state.active_node_ids], timeout=self.timeout)
        state.active_node_ids = {msg.metadata.src_node_id for msg in msgs if not msg.has_error()}
        collected: dict[int, list[bytes]] = {nid: [] for nid in state.sampled_node_ids}
        for msg in msgs:
            if msg.has_error():
                state.failures.append(Exception(msg.error))
                continue
            res = msg.content.config_records[RECORD_KEY_CONFIGS]
            for owner, share in zip(cast(list[int], res[SaKey.NODE_ID_LIST]), cast(list[bytes], res[SaKey.SHARE_LIST]),
                                    strict=True):
                collected[owner].append(share)
        private_seeds: list[bytes] = []
        pairwise: list[tuple[bytes, bool]] = []
        for nid, shares in collected.items():
            if len(shares) < state.threshold:
                log.error("Not enough shares to recover secret in unmask vectors stage")
                return False
            secret = combine_shares(shares)
            if nid in active_nids:  # the seed of an active site's private mask
                private_seeds.append(secret)
            else:  # a dropped site's secret key 1: rebuild its pairwise masks with its neighbours
                neighbours = state.nid_to_neighbours[nid]
                neighbours.remove(nid)
                for other in neighbours:
                    key = generate_shared_key(bytes_to_private_key(secret),
                                              bytes_to_public_key(state.nid_to_publickeys[other][0]))
                    pairwise.append((key, nid > other))
        reference = None
        if self.deltas:
            reference = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
                context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
        averaged = unmasked_average(state.aggregate_ndarrays, private_seeds, pairwise, state.mod_range,
                                    state.clipping_range, state.quantization_range, len(active_nids), reference)
        del state.aggregate_ndarrays
        parameters = ndarrays_to_parameters(averaged)
        results = state.legacy_results
        for _, fitres in results:
            fitres.parameters = parameters
        aggregated, metrics = context.strategy.aggregate_fit(current_round, results, state.failures)
        if aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=current_round, metrics=metrics)
        return True


def float32_global_model(context: LegacyContext) -> None:
    """Flower's own unmasking dequantizes to float64, and a strategy may hand back float64: store the global
    model as float32, or every later message (and checkpoint) doubles in size."""
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    if all(a.dtype == "float32" for a in record.values()):
        return
    arrays = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(record, keep_input=True))]
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), keep_input=True)
