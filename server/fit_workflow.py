"""The plain-FedAvg fit round of Flower's legacy path, with a timeout so a straggler can't hold a round.

Flower 1.42's ``default_fit_workflow`` waits for every reply with no timeout. This is the same round
(configure_fit → send → aggregate_fit) waiting at most ``timeout`` seconds; a site that has not answered by
then is left out (the strategy names it), and every failure carries the name of the site that sent it.
"""
from __future__ import annotations

from typing import Callable

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import Code
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid


def timed_fit_workflow(timeout: float, site_of: Callable[[int], str]):
    """A fit workflow (``workflow(grid, legacy_context)``) that waits at most ``timeout`` s for the updates."""

    def fit_round(grid: Grid, context: LegacyContext) -> None:
        current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                                      keep_input=True)
        instructions = context.strategy.configure_fit(server_round=current_round, parameters=parameters,
                                                      client_manager=context.client_manager)
        if not instructions:
            return
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        out = [Message(content=compat.fitins_to_recorddict(fitins, True), dst_node_id=proxy.node_id,
                       message_type=MessageType.TRAIN, group_id=str(current_round))
               for proxy, fitins in instructions]
        replies = list(grid.send_and_receive(out, timeout=timeout))
        results, failures = [], []
        for msg in replies:
            proxy = proxies[msg.metadata.src_node_id]
            if msg.has_content():
                fitres = compat.recorddict_to_fitres(msg.content, False)
                if fitres.status.code == Code.OK:
                    results.append((proxy, fitres))
                    continue
                failures.append(RuntimeError(f"{site_of(proxy.node_id)}: {fitres.status.message}"))
            else:
                failures.append(RuntimeError(f"{site_of(proxy.node_id)}: {msg.error.reason}"))
        params, _ = context.strategy.aggregate_fit(current_round, results, failures)
        if params:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)

    return fit_round
