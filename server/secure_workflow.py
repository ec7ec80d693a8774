"""Flower's SecAggPlusWorkflow, reporting to the strategy when a round halts (which stage, who was missing).

Flower 1.42's workflow just logs "Secure aggregation halted." and returns when too few sites stay alive (or
answer before the stage timeout), so ``aggregate_fit`` never runs and nobody learns which site failed or
timed out. This runs the same four stages and, on a halt, hands the protocol state to
``strategy.secure_round_halted`` so the run's metrics name the failed sites and the stragglers.
"""
from __future__ import annotations

from typing import cast

from flwr.server import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
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
