"""Benchmark: a trained diffusion release's sampling-only settings (DDIM steps × η), judged on validation data.

    python -m simulations.bench_sampler_settings RUN_DIR [RUN_DIR ...] [--steps 5 10 20 40] [--eta 0 1]

Sampling settings are post-processing of the released weights, so they cost no privacy; they are judged on
the bundled val split (a public stand-in), never on the test split. For each run folder and setting: TSTR AUC
with the release report's recipe (the mean over its 3 classifier seeds, each seed's figure beside it) on
2,000 class-balanced samples, and the sampling time.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from client.data import load_dataset
from fedsynth.config import DEFAULT_DATA

from . import metrics as M
from .generate import load_run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="diffusion run folders (weights.safetensors, config.json)")
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 40])
    p.add_argument("--eta", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args(argv)
    val = load_dataset(DEFAULT_DATA, "val")
    for run in args.runs:
        model, _ = load_run(run)
        if model.family != "diffusion":
            raise ValueError(f"{run / 'config.json'}: model is {model.family!r}; expected a diffusion run")
        for steps in args.steps:
            for eta in args.eta:
                model.sampler_steps, model.eta = steps, eta
                y = M.balanced_labels(args.n, model.num_classes, 0)
                t0 = time.perf_counter()
                x = M.sample_images(model, y, seed=0)
                took = time.perf_counter() - t0
                r = M.train_and_test(x, y.numpy(), val.images, val.labels, model.num_classes, seed=0)
                per_seed = ", ".join(f"{s['auc']:.3f}" for s in r["per-seed"])
                print(f"{run.name}  steps {steps:3d}  eta {eta:.2f}: val TSTR AUC {r['auc']['value']:.3f} "
                      f"(per classifier seed {per_seed}), "
                      f"sampling {took:.1f} s", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
