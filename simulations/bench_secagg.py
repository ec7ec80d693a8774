"""Secure-aggregation cost and wire size: plain FedAvg, Flower's stock SecAgg+ and fedsynth's SecAgg+, side by side.

    python -m simulations.bench_secagg [--sites 5] [--params 1000000] [--rounds 4]

One real Flower Simulation Engine run (``run_simulation``, Ray) with ``--sites`` clients that do no training:
each returns the global weights it received plus a small perturbation seeded by (site, round). The ServerApp
runs the rounds itself and cycles through the modes round by round (plain, stock, fedsynth, fedsynth-deltas, plain, ...), so
the modes share the same processes and the same load on this shared machine:

- plain: Flower's ``default_fit_workflow`` (FedAvg), no mod on the client;
- stock: Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod``, with fedsynth's SecAgg+ parameters;
- fedsynth: ``server.server_app.secure_fit_workflow`` + ``client.client_app.secure_aggregation_mod``, i.e.
  whatever the project's secure path is now;
- fedsynth-deltas: the same with ``secagg-deltas`` on (sites mask update − global model, 16-bit modulus).

Per mode: seconds per round (median; the fit workflow only), its ratio to plain, bytes a site sends per round
(every reply of every stage, serialized with Flower's own protobuf serde), bytes of the global-model message
the server sends (the fit instruction, same serde), and the max abs error of the aggregate vs the exact
float64 mean of what the sites meant to send. The first round of each mode is a warm-up and not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("plain", "stock", "fedsynth", "fedsynth-deltas")
PERTURBATION = 1e-3  # what a site adds to the global weights (no training): the "update"


def layer_shapes(params: int) -> list[tuple[int, ...]]:
    """A few conv/linear-like layers (weights and biases) totalling about ``params`` float32 values."""
    width = max(1, int(round((params / 4) ** 0.5)))
    return [(width, width), (width,), (2 * width, width), (2 * width,), (width, width), (width,), (16, 3, 3, 3)]


def initial_weights(shapes, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.05 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


def site_update(weights: list[np.ndarray], site: int, rnd: int, seed: int) -> list[np.ndarray]:
    """What site ``site`` sends in round ``rnd``: the global weights plus a seeded perturbation (float32)."""
    rng = np.random.default_rng([seed, site, rnd])
    return [(w + PERTURBATION * rng.standard_normal(w.shape)).astype(np.float32) for w in weights]


def proto_bytes(content) -> int:
    from flwr.common.serde import recorddict_to_proto
    return len(recorddict_to_proto(content).SerializeToString())


def mode_of(group_id: str) -> str:
    return MODES[(int(group_id or 1) - 1) % len(MODES)]


def make_client_app(log_dir: str, seed: int):
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.client_app import secure_aggregation_mod

    class NoTrainingClient(NumPyClient):
        def __init__(self, site: int):
            self.site = site

        def fit(self, parameters, config):
            return site_update(parameters, self.site, int(config["server-round"]), seed), 1, {}

    def measuring_mod(msg, ctxt, call_next):
        """Routes the message to the mode's mod and logs the serialized size of what came in and went out."""
        mode = mode_of(msg.metadata.group_id)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = str(configs[Key.STAGE]) if configs is not None and Key.STAGE in configs else "fit"
        size_in = proto_bytes(msg.content)
        if mode == "stock":
            out = secaggplus_mod(msg, ctxt, call_next)
        elif mode.startswith("fedsynth"):
            out = secure_aggregation_mod(msg, ctxt, call_next)
        else:
            out = call_next(msg, ctxt)
        row = {"mode": mode, "round": int(msg.metadata.group_id), "stage": stage,
               "in": size_in, "out": proto_bytes(out.content) if out.has_content() else 0}
        with open(Path(log_dir) / f"site-{ctxt.node_config['partition-id']}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return out

    def client_fn(context):
        return NoTrainingClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[measuring_mod])


def make_server_app(sites: int, rounds: int, shapes, seed: int, result_path: str, pull_interval: float | None = None):
    from flwr.app import ConfigRecord
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_fit_workflow, default_init_params_workflow

    from server.secagg_choice import secagg_choice
    from server.server_app import SECAGG, secure_fit_workflow

    app = ServerApp()

    @app.main()
    def main(grid, context):
        if pull_interval is not None:  # the in-memory grid's poll for replies (Flower's default 0.1 s)
            grid.pull_interval = pull_interval
        start = initial_weights(shapes, seed)
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites,
                          min_available_clients=sites, initial_parameters=ndarrays_to_parameters(start),
                          on_fit_config_fn=lambda rnd: {"server-round": rnd,
                                                        "secagg-deltas": mode_of(str(rnd)) == "fedsynth-deltas"})
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflows = {"plain": default_fit_workflow,
                     "stock": SecAggPlusWorkflow(**{**SECAGG, **secagg_choice(sites)[0]}),
                     "fedsynth": secure_fit_workflow(sites)[0],
                     "fedsynth-deltas": secure_fit_workflow(sites, deltas=True)[0]}
        thread, f_stop, c_done = start_update_client_manager_thread(grid, legacy.client_manager)
        c_done.wait()
        rows = []
        try:
            default_init_params_workflow(grid, legacy)
            cfg = ConfigRecord({Key.START_TIME: time.time(), Key.CURRENT_ROUND: 0})
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for rnd in range(1, rounds * len(MODES) + 1):
                mode = mode_of(str(rnd))
                cfg[Key.CURRENT_ROUND] = rnd
                before = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
                    legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
                t0 = time.perf_counter()
                workflows[mode](grid, legacy)
                seconds = time.perf_counter() - t0
                after = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
                    legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
                exact = [np.mean([site_update(before, s, rnd, seed)[i].astype(np.float64) for s in range(sites)],
                         axis=0) for i in range(len(before))]
                error = max(float(np.abs(a.astype(np.float64) - e).max()) for a, e in zip(after, exact))
                rows.append({"mode": mode, "round": rnd, "seconds": seconds, "max-abs-error": error,
                             "global-dtype": str(after[0].dtype)})
                # every mode starts from the same kind of model: float32 (stock SecAgg+ hands back float64)
                legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                    ndarrays_to_parameters([a.astype(np.float32) for a in after]), keep_input=True)
        finally:
            f_stop.set()
            thread.join()
            Path(result_path).write_text(json.dumps(rows))

    return app


def summarize(rows: list[dict], sizes: list[dict], sites: int, parameters: int) -> list[dict]:
    out = []
    for mode in MODES:
        timed = [r for r in rows if r["mode"] == mode][1:]  # first round of each mode: warm-up
        counted = {r["round"] for r in timed}
        mine = [s for s in sizes if s["mode"] == mode and s["round"] in counted]
        per_round_out = sum(s["out"] for s in mine) / max(1, len(counted)) / sites
        fit_in = [s["in"] for s in mine if s["stage"] in ("fit", "collect_masked_vectors")]
        out.append({"mode": mode, "parameters": parameters, "rounds": len(timed), "s-per-round": statistics.median(r["seconds"] for r in timed),
                    "bytes-sent-per-site-round": per_round_out, "global-model-message-bytes": max(fit_in or [0]),
                    "max-abs-error": max(r["max-abs-error"] for r in timed),
                    "aggregate-dtype": timed[-1]["global-dtype"]})
    plain = out[0]["s-per-round"]
    for r in out:
        r["ratio-vs-plain"] = r["s-per-round"] / plain
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--params", type=int, default=1_000_000, help="about this many float32 parameters")
    p.add_argument("--rounds", type=int, default=5, help="rounds per mode (the first one is a warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the table to this JSON file")
    p.add_argument("--pull-interval", type=float, default=None,
                   help="seconds between the server's polls for replies (default: Flower's, 0.1): every SecAgg+ "
                        "stage is a message round trip that waits for it")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the first round of each mode is a warm-up)")
    import logging

    import torch
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    shapes = layer_shapes(args.params)
    n = sum(int(np.prod(s)) for s in shapes)
    with tempfile.TemporaryDirectory(prefix="fs-secagg-") as tmp:
        result = os.path.join(tmp, "rounds.json")
        t0 = time.time()
        run_simulation(
            server_app=make_server_app(args.sites, args.rounds, shapes, args.seed, result, args.pull_interval),
            client_app=make_client_app(tmp, args.seed), num_supernodes=args.sites,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"include_dashboard": False, "num_cpus": max(1, os.cpu_count() or 1),
                                          "_temp_dir": os.path.join(tmp, "ray"), "logging_level": logging.ERROR,
                                          "log_to_driver": False}})
        wall = time.time() - t0
        if not os.path.exists(result):
            raise SystemExit("the simulation ended without results (see Flower's log above)")
        rows = json.loads(Path(result).read_text())
        sizes = [json.loads(line) for f in sorted(Path(tmp).glob("site-*.jsonl")) for line in f.read_text().splitlines()]
    table = summarize(rows, sizes, args.sites, n)
    for r in table:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    print(f"\n{args.sites} sites, {n:,} float32 parameters ({4 * n / 2**20:.2f} MiB), clients do no training, "
          f"{args.rounds - 1} timed rounds per mode (after 1 warm-up), modes interleaved, server poll "
          f"{args.pull_interval if args.pull_interval is not None else 'Flower default 0.1'} s; wall {wall:.0f} s")
    print("| mode | s/round | × plain | bytes sent per site per round | global model message, bytes | "
          "aggregate dtype | max abs error vs exact mean |\n|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['mode']} | {r['s-per-round']:.3f} | {r['ratio-vs-plain']:.2f} | "
              f"{r['bytes-sent-per-site-round']:,.0f} | {r['global-model-message-bytes']:,} | {r['aggregate-dtype']} | "
              f"{r['max-abs-error']:.2e} |")


if __name__ == "__main__":
    main()
