"""The ServerApp: FedAvg rounds on Flower's legacy path, so ``secure`` only swaps the fit workflow for SecAgg+.

Each round: sites that said they can pay for it train (plain or SecAgg+ fit workflow), the server
checkpoints, then every site reports its spend and whether it can pay for the next round.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_evaluate_workflow,
    default_fit_workflow,
    default_init_params_workflow,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid

from fedsynth.config import RunConfig

from .checkpoint import save_checkpoint
from .run_folder import write_run_folder
from .strategy import FedSynthStrategy

log = logging.getLogger("fedsynth.server")

# SecAgg+ quantizes every value after clipping it to ±CLIPPING_RANGE (2**22 levels): generator weights stay
# well inside ±8 (sites check and refuse to send otherwise), and every site sends weight 1, so max_weight=1
# keeps the full quantization precision (~4e-6 per value).
SECAGG = dict(num_shares=1.0, reconstruction_threshold=0.5, clipping_range=8.0, max_weight=1.0)


def secure_fit_workflow() -> SecAggPlusWorkflow:
    return SecAggPlusWorkflow(**SECAGG)


def run_federation(grid: Grid, context: Context, run: RunConfig, class_names: list[str] | None = None) -> Path:
    extra = {"secagg-clipping-range": SECAGG["clipping_range"]} if run.secure else {}
    strategy = FedSynthStrategy(run, extra)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=run.rounds), strategy=strategy)
    fit_workflow = secure_fit_workflow() if run.secure else default_fit_workflow
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    thread, f_stop, c_done = start_update_client_manager_thread(grid, legacy.client_manager)
    c_done.wait()
    start = time.time()
    stop_reason = None
    try:
        default_init_params_workflow(grid, legacy)
        cfg = ConfigRecord({Key.START_TIME: start, Key.CURRENT_ROUND: 0})
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        default_evaluate_workflow(grid, legacy)  # round 0: the roll call before any training
        for rnd in range(1, run.rounds + 1):
            stop_reason = strategy.why_stop()
            if stop_reason:
                log.warning("run %s ends before round %d: %s", run.run_id, rnd, stop_reason)
                break
            cfg[Key.CURRENT_ROUND] = rnd
            t0 = time.time()
            fit_workflow(grid, legacy)
            weights = strategy.weights(_parameters(legacy))
            entry = strategy.round_metrics.setdefault(rnd, {"round": rnd})
            entry["seconds"] = round(time.time() - t0, 2)
            save_checkpoint(run_dir, rnd, weights, {"run_id": run.run_id, "config": run.to_flower(),
                                                    "metrics": entry})
            default_evaluate_workflow(grid, legacy)
            eps = ", ".join(f"{s} ε={e:.2f}" for s, e in entry.get("epsilon", {}).items())
            log.info("round %d/%d done in %.1fs: sites %s; %s", rnd, run.rounds, entry["seconds"],
                     ",".join(entry.get("sites", [])) or "none", eps)
    finally:
        f_stop.set()
        thread.join()
    write_run_folder(run_dir, run, strategy, strategy.weights(_parameters(legacy)), time.time() - start,
                     stop_reason, class_names)
    return run_dir


def _parameters(legacy: LegacyContext):
    return compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)


def make_server_app(run: RunConfig | None = None, class_names: list[str] | None = None) -> ServerApp:
    """A ServerApp with ``run`` baked in (simulation runner), or read from Flower's run_config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dir = run_federation(grid, context, run or RunConfig.from_flower(dict(context.run_config)), class_names)
        log.info("results in %s", run_dir)

    return app


app = make_server_app()
