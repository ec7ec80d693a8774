"""Benchmark: the release report's figures for every family × ε, plus a non-private reference (issue 4).

``python -m simulations.bench_release_table --out /tmp/table [--families vae gan diffusion] [--epsilons 1 10]
[--sites 4] [--partition dirichlet:0.5]`` runs, for each family and ε, the real ``fedsynth simulate`` (a fresh
state folder each, so each site's ε starts at 0; SecAgg+, the release report at the end) and reads its
``report.json``. The non-private reference per family trains the same generator with the same recipe
(steps, expected batch, learning-rate schedule) on the *pooled* training parts of the same simulated sites,
without clipping or noise, and gets the same release report — the upper bound a DP federation is measured
against. One markdown table at the end (and ``table.json``); each row's wall time is the whole command's.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedsynth.config import RunConfig
from models import FAMILIES, build_generator
from server.checkpoint import save_weights, write_json

COLUMNS = ("FID", "KID", "precision", "recall", "TSTR AUC", "MIA AUC (black / white)", "max ε", "wall")


def figures(report: dict, wall: float) -> dict:
    fid, util, mia = report["fidelity"], report["utility"], report["membership-inference"]
    pr = fid["precision-recall"]
    return {"FID": fid["fid"]["value"], "KID": fid["kid"]["value"], "precision": pr["precision"]["value"],
            "recall": pr["recall"]["value"], "TSTR AUC": util["tstr"]["auc"]["value"],
            "TRTR AUC": util["trtr"]["auc"]["value"],
            "MIA black": mia.get("black-box", {}).get("auc", {}).get("value", math.nan),
            "MIA white": mia.get("white-box", {}).get("auc", {}).get("value", math.nan),
            "max ε": report["privacy"]["max-epsilon"], "wall": wall}


def private_run(family: str, eps: float, args, out: Path) -> dict:
    run_id = f"{family}-eps{eps:g}"
    cmd = [sys.executable, "-m", "fedsynth.cli", "simulate", "--model", family, "--epsilon", str(eps),
           "--sites", str(args.sites), "--partition", args.partition, "--seed", str(args.seed),
           "--state-dir", str(out / run_id / "state"), "--out", str(out / run_id / "runs"), "--run-id", run_id]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{run_id}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    report = json.loads((out / run_id / "runs" / run_id / "report.json").read_text())
    return figures(report, wall)


def non_private_run(family: str, args, out: Path, like: Path) -> dict:
    """The same generator and recipe on the pooled sites' training parts, no clipping, no noise."""
    from client.data import load_npz
    from client.trainer import cosine_lr
    from privacy.accountant import steps_per_round
    from simulations.report import evaluate

    t0 = time.perf_counter()
    cfg = json.loads((like / "config.json").read_text())
    run = RunConfig.from_flower(cfg, source=str(like / "config.json"))
    parts = [load_npz(Path(run.state_dir) / f"site-{k}" / "data.npz", "train", run.resolution, run.num_classes)
             for k in range(run.sites)]
    x = torch.from_numpy(np.concatenate([p.images for p in parts]))
    y = torch.from_numpy(np.concatenate([p.labels for p in parts]))
    steps = steps_per_round(run.local_epochs, run.sample_rate) * run.rounds  # what each site took
    batch = max(1, round(run.sample_rate * len(x) / run.sites))  # a site's expected batch
    torch.manual_seed(args.seed)
    model = build_generator(family, **run.model_kwargs())
    lr_max = run.lr  # the private run's schedule, as its config.json recorded it
    lr_at = cosine_lr(run.lr, run.lr_final, 0, steps)
    module = model.private_module()
    opt, public = model.optimizer(module.parameters(), lr_max), model.public_optimizer(lr_max)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(steps):
        for o in (opt, public):
            for group in (o.param_groups if o is not None else []):
                group["lr"] = lr_at(step)
        idx = torch.randint(len(x), (batch,), generator=g)
        model.train_step(module, opt, x[idx], y[idx], public=public)
        if step % 100 == 0:
            print(f"  non-private {family}: step {step}/{steps}", flush=True)
    model.eval()
    run_dir = out / f"{family}-non-private"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / "weights.safetensors", model.shared_weights(), {"family": family})
    write_json(run_dir / "config.json", {**cfg, "run-id": f"{family}-non-private"})
    write_json(run_dir / "metrics.json", {"rounds": []})
    write_json(run_dir / "privacy.json", {"pooled, non-private": {
        "epsilon": math.inf, "delta": 0.0, "unit": "none (no clipping, no noise)", "steps": steps}})
    report = evaluate(run_dir)
    return figures(report, time.perf_counter() - t0)


def fmt(row: dict) -> str:
    def f(v, p=3):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"
    eps = "∞" if math.isinf(row["max ε"]) else f"{row['max ε']:.2f}"
    return (f"| {row['family']} | {row['setting']} | {f(row['FID'])} | {f(row['KID'], 4)} | {f(row['precision'])} | "
            f"{f(row['recall'])} | {f(row['TSTR AUC'])} (TRTR {f(row['TRTR AUC'])}) | {f(row['MIA black'])} / "
            f"{f(row['MIA white'])} | {eps} | {row['wall'] / 60:.1f} min |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip the non-private rows")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families:
        for eps in args.epsilons:
            rows.append({"family": family, "setting": f"ε = {eps:g}", **private_run(family, eps, args, args.out)})
            print(fmt(rows[-1]), flush=True)
        if not args.no_reference:
            like = args.out / f"{family}-eps{args.epsilons[-1]:g}" / "runs" / f"{family}-eps{args.epsilons[-1]:g}"
            rows.append({"family": family, "setting": "non-private (pooled)",
                         **non_private_run(family, args, args.out, like)})
            print(fmt(rows[-1]), flush=True)
        write_json(args.out / "table.json", rows)
    print("\n| family | setting | FID | KID | precision | recall | TSTR AUC | MIA AUC (black / white) | max ε | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(fmt(row))


if __name__ == "__main__":
    main()
