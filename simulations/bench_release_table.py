"""Benchmark: the release report's figures for every family × ε × recipe, plus a non-private reference (issues 4, 9).

``python -m simulations.bench_release_table --out /tmp/table [--families vae gan diffusion] [--epsilons 1 10]
[--class-mean-shares 0 0.3] [--seeds 0 1 2] [--sites 4] [--partition dirichlet:0.5]`` runs, for each family,
recipe (class-mean-share: 0 = no class-mean release) , ε and seed, the real ``fedsynth simulate`` (a fresh state
folder each, so each site's ε starts at 0; SecAgg+, the release report at the end) and reads its
``report.json``. The seed sets the partition, the model's initialization, the DP noise and the report's
classifier seeds. The non-private reference per family, recipe and seed trains the same generator with the
same recipe (the exact class means when the recipe releases them, the same steps, expected batch and
learning-rate schedule) on the *pooled* training parts of the same simulated sites, without clipping or
noise, and gets the same release report — the upper bound a DP federation is measured against. One markdown
table at the end, each figure the mean ± sd over the seeds (and ``table.json`` with every run); the wall time
is the whole command's, per run.
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

def figures(report: dict, wall: float) -> dict:
    fid, util, mia = report["fidelity"], report["utility"], report["membership-inference"]
    pr = fid["precision-recall"]
    return {"FID": fid["fid"]["value"], "KID": fid["kid"]["value"], "precision": pr["precision"]["value"],
            "recall": pr["recall"]["value"], "TSTR AUC": util["tstr"]["auc"]["value"],
            "TRTR AUC": util["trtr"]["auc"]["value"],
            "MIA black": mia.get("black-box", {}).get("auc", {}).get("value", math.nan),
            "MIA white": mia.get("white-box", {}).get("auc", {}).get("value", math.nan),
            "max ε": report["privacy"]["max-epsilon"], "wall": wall}


def run_name(family: str, share: float, eps: float, seed: int) -> str:
    return f"{family}-share{share:g}-eps{eps:g}-seed{seed}"


def check_complete(run_dir: Path) -> None:
    """A row is only tabulated from a run that did all it planned: every round aggregated, none lost (a run that
    stopped early, or lost a round, spent less ε and trained less than its row would claim)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lost = {site: rounds for site, rounds in (metrics.get("charged-not-used") or {}).items() if rounds}
    if metrics.get("stop-reason") or lost:
        raise RuntimeError(f"{run_dir}: the run did not complete (stop reason: {metrics.get('stop-reason')}; "
                           f"charged but not used: {lost or 'none'}); see its summary.txt. Not tabulated: "
                           f"remove {run_dir.parent.parent} and run the table again")


def private_run(family: str, share: float, eps: float, seed: int, args, out: Path) -> dict:
    run_id = run_name(family, share, eps, seed)
    cmd = [sys.executable, "-m", "fedsynth.cli", "simulate", "--model", family, "--epsilon", str(eps),
           "--class-mean-share", str(share), "--sites", str(args.sites), "--partition", args.partition,
           "--seed", str(seed), "--state-dir", str(out / run_id / "state"), "--out", str(out / run_id / "runs"),
           "--run-id", run_id]
    report_path, wall_path = out / run_id / "runs" / run_id / "report.json", out / run_id / "wall.txt"
    if report_path.exists() and wall_path.exists():  # a finished run of an interrupted table: reuse it
        check_complete(report_path.parent)
        print(f"  reusing {report_path}", flush=True)
        return figures(json.loads(report_path.read_text()), float(wall_path.read_text()))
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{run_id}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    wall_path.write_text(f"{wall:.1f}\n")
    check_complete(report_path.parent)
    return figures(json.loads(report_path.read_text()), wall)


def non_private_run(family: str, seed: int, out: Path, like: Path) -> dict:
    """The same generator and recipe on the pooled sites' training parts, no clipping, no noise."""
    from client.data import load_npz
    from client.trainer import cosine_lr
    from privacy.accountant import steps_per_round
    from privacy.class_means import release
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
    torch.manual_seed(seed)
    model = build_generator(family, **run.model_kwargs())
    if run.class_mean_share > 0:  # the recipe's class prior, from the exact (noise-free) pooled class means
        side = run.resolution // run.coarse
        exact = release(x.numpy(), y.numpy(), run.num_classes, 0.0, run.coarse)
        model.set_class_means(torch.as_tensor(exact.means(), dtype=torch.float32)
                              .view(run.num_classes, run.channels, side, side))
    lr_max = run.lr  # the private run's schedule, as its config.json recorded it
    lr_at = cosine_lr(run.lr, run.lr_final, 0, steps)
    module = model.private_module()
    opt, public = model.optimizer(module.parameters(), lr_max), model.public_optimizer(lr_max)
    g = torch.Generator().manual_seed(seed)
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
    run_dir = out / f"{like.name}-non-private"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / "weights.safetensors", model.shared_weights(), {"family": family})
    write_json(run_dir / "config.json", {**cfg, "run-id": run_dir.name})
    write_json(run_dir / "metrics.json", {"rounds": []})
    write_json(run_dir / "privacy.json", {"pooled, non-private": {
        "epsilon": math.inf, "delta": 0.0, "unit": "none (no clipping, no noise)", "steps": steps}})
    report = evaluate(run_dir)
    return figures(report, time.perf_counter() - t0)


FIGURES = ("FID", "KID", "precision", "recall", "TSTR AUC", "TRTR AUC", "MIA black", "MIA white", "max ε", "wall")


def summarize(runs: list[dict]) -> dict:
    """Per figure: the mean and (over ≥ 2 seeds) the sample sd of the runs' values."""
    out = {}
    for k in FIGURES:
        v = np.array([r[k] for r in runs], dtype=float)
        out[k] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)
    return out


def fmt(row: dict) -> str:
    def f(k, p=3):
        mean, sd = row["summary"][k]
        if mean is None or math.isnan(mean):
            return "—"
        return f"{mean:.{p}f}" + ("" if sd is None else f" ± {sd:.{p}f}")
    eps = "∞" if math.isinf(row["summary"]["max ε"][0]) else f"{row['summary']['max ε'][0]:.2f}"
    return (f"| {row['family']} | {row['recipe']} | {row['setting']} | {len(row['runs'])} | {f('FID', 2)} | "
            f"{f('precision')} | {f('recall')} | {f('TSTR AUC')} | {f('TRTR AUC')} | {f('MIA black')} / "
            f"{f('MIA white')} | {eps} | {row['summary']['wall'][0] / 60:.1f} min |")


HEADER = ("| family | recipe | setting | seeds | FID | precision | recall | TSTR AUC | TRTR AUC | "
          "MIA AUC (black / white) | max ε | wall per run |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    p.add_argument("--class-mean-shares", nargs="+", type=float, default=[RunConfig().class_mean_share])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--no-reference", action="store_true", help="skip the non-private rows")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families:
        for share in args.class_mean_shares:
            recipe = f"class-mean-share {share:g}"
            for eps in args.epsilons + ([] if args.no_reference else [math.inf]):
                runs = []
                for seed in args.seeds:
                    if math.isinf(eps):  # the non-private reference, like the seed's last private run
                        name = run_name(family, share, args.epsilons[-1], seed)
                        runs.append(non_private_run(family, seed, args.out, args.out / name / "runs" / name))
                    else:
                        runs.append(private_run(family, share, eps, seed, args, args.out))
                    print(f"  seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.4g}" for k in FIGURES), flush=True)
                setting = "non-private (pooled)" if math.isinf(eps) else f"ε = {eps:g}"
                rows.append({"family": family, "recipe": recipe, "setting": setting, "seeds": args.seeds,
                             "runs": runs, "summary": summarize(runs)})
                print(HEADER.splitlines()[0] + "\n" + fmt(rows[-1]), flush=True)
                write_json(args.out / "table.json", rows)
    print("\n" + HEADER)
    for row in rows:
        print(fmt(row))


if __name__ == "__main__":
    main()
