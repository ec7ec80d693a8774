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
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_evaluate_workflow,
    default_init_params_workflow,
)
from flwr.common import ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid

from fedsynth.config import RunConfig

from .checkpoint import save_checkpoint, write_json
from .class_means import class_mean_round
from .fit_workflow import timed_fit_workflow
from .resume import Resumed, last_checkpoint
from .secagg_choice import secagg_choice
from .secure_workflow import ReportingSecAggPlusWorkflow
from .run_folder import write_run_folder
from .strategy import FedSynthStrategy

log = logging.getLogger("fedsynth.server")

# SecAgg+ quantizes every value after clipping it to ±CLIPPING_RANGE (2**22 levels): generator weights stay
# well inside ±8 (sites check and refuse to send otherwise), and every site sends weight 1, so max_weight=1
# keeps the full quantization precision (~4e-6 per value).
# num_shares / reconstruction_threshold are chosen from the number of sites per round (server/secagg_choice.py).
SECAGG = dict(num_shares=1.0, reconstruction_threshold=0.5, clipping_range=8.0, max_weight=1.0)
# secagg-deltas: sites mask (update − global model) instead, clipped to ±2 (a site refuses to send an update
# outside it), modulo 2**16 so each masked value travels as uint16 (half the bytes of uint32); the
# quantization range is the largest power of two whose sum over the sampled sites stays below the modulus.
SECAGG_DELTAS = dict(clipping_range=2.0, modulus_range=2 ** 16)


def delta_quantization_range(sampled: int) -> int:
    """Largest power of two q with sampled · q < 2**16: the sum of the sites' quantized values can't wrap."""
    q = 1 << ((2 ** 16 - 1) // max(1, sampled)).bit_length() - 1
    if q < 2:
        raise ValueError(f"secagg-deltas: {sampled} sites per round leave no room in a 16-bit modulus")
    return q


ROLLCALL_RETRIES = 2  # before a run ends for lack of willing sites, when some sites failed rather than refused


def secure_fit_workflow(sampled: int = 2, fail_probability: float = 0.0, timeout: float | None = None,
                        deltas: bool = False) -> tuple[ReportingSecAggPlusWorkflow, str]:
    """SecAgg+ for ``sampled`` sites per round, and one line saying why its threshold (for the run summary)."""
    chosen, why = secagg_choice(sampled, fail_probability)
    if deltas:
        chosen = {**chosen, **SECAGG_DELTAS, "quantization_range": delta_quantization_range(sampled)}
    return ReportingSecAggPlusWorkflow(**{**SECAGG, **chosen}, timeout=timeout, deltas=deltas), why


def run_federation(grid: Grid, context: Context, run: RunConfig, class_names: list[str] | None = None,
                   resume: bool = False) -> Path:
    """Run every round of ``run``; with ``resume``, continue from the run folder's last complete checkpoint."""
    extra = {"secagg-clipping-range": (SECAGG_DELTAS if run.secagg_deltas else SECAGG)["clipping_range"]} \
        if run.secure else {}
    strategy = FedSynthStrategy(run, extra)
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = last_checkpoint(run_dir, run, strategy.model.shared_weights()) if resume else Resumed()
    if resumed.weights is not None:
        strategy.initial_parameters = ndarrays_to_parameters(list(resumed.weights.values()))
        strategy.round_metrics = {r["round"]: r for r in resumed.rounds}
        strategy.refusals = list(resumed.refusals)
        log.info("run %s resumes after round %d (last complete checkpoint)", run.run_id, resumed.round)
    write_json(run_dir / "config.json", {**run.to_flower(), "class-names": class_names or []})  # resume reads it
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=run.rounds), strategy=strategy)
    if run.secure:
        sampled = max(2, round(run.fraction * run.sites))
        fit_workflow, strategy.secagg_note = secure_fit_workflow(sampled, run.dropout + run.straggler,
                                                                 run.round_timeout, run.secagg_deltas)
    else:
        fit_workflow = timed_fit_workflow(run.round_timeout, strategy.site_of)

    thread, f_stop, c_done = start_update_client_manager_thread(grid, legacy.client_manager)
    c_done.wait()
    start = time.time()
    stop_reason = None
    try:
        default_init_params_workflow(grid, legacy)
        cfg = ConfigRecord({Key.START_TIME: start, Key.CURRENT_ROUND: resumed.round})
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        default_evaluate_workflow(grid, legacy)  # the roll call before the first round (to be) trained
        if run.class_mean_share > 0 and resumed.weights is None:
            stop_reason = strategy.why_stop()
            if not stop_reason:  # round 0: the class-mean releases become the model's class prior
                t0 = time.time()
                weights = class_mean_round(grid, legacy, strategy, fit_workflow)
                entry = strategy.round_metrics[0]
                entry["seconds"] = round(time.time() - t0, 2)
                save_checkpoint(run_dir, 0, weights, {
                    "run_id": run.run_id, "config": run.to_flower(), "metrics": entry, "refusals": strategy.refusals,
                    "rounds": [strategy.round_metrics[r] for r in sorted(strategy.round_metrics)]})
                default_evaluate_workflow(grid, legacy)  # the sites' spend after the release
        for rnd in range(resumed.round + 1, run.rounds + 1):
            stop_reason = strategy.why_stop()
            for _ in range(ROLLCALL_RETRIES):  # a site that crashed at the roll call may be back: ask again
                if not (stop_reason and strategy.rollcall_failures):
                    break
                log.warning("roll call before round %d: %d site(s) did not answer; asking again", rnd,
                            strategy.rollcall_failures)
                default_evaluate_workflow(grid, legacy)
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
            if not entry.get("sites"):  # no aggregate: the global model stays; the round is not retried, as
                # sites that sent an update were charged for it and a retry would charge them beyond the plan
                entry["skipped"] = _why_skipped(entry, run)
                log.warning("round %d/%d skipped: %s", rnd, run.rounds, entry["skipped"])
            save_checkpoint(run_dir, rnd, weights, {
                "run_id": run.run_id, "config": run.to_flower(), "metrics": entry, "refusals": strategy.refusals,
                "rounds": [strategy.round_metrics[r] for r in sorted(strategy.round_metrics)]})
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


def _why_skipped(entry: dict, run: RunConfig) -> str:
    if entry.get("rejected-aggregate"):
        return f"the aggregate was rejected ({entry['rejected-aggregate']})"
    if entry.get("rejected") and run.secure:
        return "a bad update was inside the secure sum (" + "; ".join(
            f"{r['site']}: {r['reason']}" for r in entry["rejected"]) + ")"
    if entry.get("rejected") and not entry.get("failures"):
        return "every update was rejected"
    if "sites" not in entry and run.secure:
        return (f"secure aggregation could not complete (halted at the {entry.get('halted-at', '?')} stage): too "
                f"few sites stayed alive to rebuild the masks (failed: {len(entry.get('failures', []))}, no answer "
                f"in time: {len(entry.get('no-answer', []))} of {len(entry.get('sampled', []))}); sites that sent "
                "a masked update stay charged")
    return (f"no usable update (failed: {len(entry.get('failures', []))}, no answer: "
            f"{len(entry.get('no-answer', []))}, rejected: {len(entry.get('rejected', []))} of "
            f"{len(entry.get('sampled', []))})")


def _parameters(legacy: LegacyContext):
    return compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)


def make_server_app(run: RunConfig | None = None, class_names: list[str] | None = None,
                    resume: bool = False) -> ServerApp:
    """A ServerApp with ``run`` baked in (simulation runner), or read from Flower's run_config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_progress()
        # `resume` in the run config: the deployment server's --resume (fedsynth server --resume RUN_DIR)
        run_dir = run_federation(grid, context, run or RunConfig.from_flower(dict(context.run_config)), class_names,
                                 resume or bool(context.run_config.get("resume", False)))
        log.info("results in %s", run_dir)

    return app


def _log_progress() -> None:
    """Under ``flwr run`` the ServerApp is its own process (flwr-serverapp) whose stdout/stderr Flower streams to
    ``flwr run --stream`` / ``flwr log``: give the round lines a handler there. Where logging is set up already
    (the fedsynth CLI, pytest), leave it alone. Keep Opacus out of the ServerApp's imports: importing it calls
    ``logging.basicConfig`` (a root handler at WARNING), after which these INFO lines would silently vanish."""
    fed = logging.getLogger("fedsynth")
    if not fed.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        fed.addHandler(handler)
        fed.setLevel(logging.INFO)


app = make_server_app()
