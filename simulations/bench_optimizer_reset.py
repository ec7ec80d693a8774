"""Benchmark: does restarting the optimizer every round cost a private generator its classes?

``python -m simulations.bench_optimizer_reset [--family diffusion] [--mode reset|continuous]`` trains one site
(1,570 bundled training images) at the demo's per-site budget (σ = 4.324, q = 0.3, 800 DP steps, C = 1: ε = 10
at δ = 1e-5) either as one run of 800 steps with one optimizer (``continuous``) or as 20 runs of 40 steps,
each with a fresh DP optimizer — what every federated round does today (``reset``) — on the same learning-rate
schedule, then prints the shipped classifier's class agreement on 200 samples per class and writes a grid.
No federation: it isolates the optimizer restart from the averaging of sites.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from client.data import load_dataset
from client.trainer import cosine_lr, train_private
from fedsynth.config import DEFAULT_DATA, RunConfig
from models import FAMILIES, build_generator
from server.run_folder import sample_grid, save_png
from simulations.runner import reference_classifier

SIGMA, Q, STEPS, ROUND_STEPS, SITE_IMAGES = 4.324, 0.3, 800, 40, 1570


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="diffusion", choices=list(FAMILIES))
    p.add_argument("--mode", default="reset", choices=["reset", "continuous"])
    p.add_argument("--out", type=Path, default=Path("bench-optimizer-reset"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(DEFAULT_DATA, "train")
    site = data.subset(np.random.default_rng(args.seed).choice(len(data), SITE_IMAGES, replace=False))
    run = RunConfig(model=args.family)
    lr_max, lr_min = FAMILIES[args.family].default_lr
    torch.manual_seed(args.seed)
    model = build_generator(args.family, **run.model_kwargs())
    t0 = time.time()
    chunks = STEPS // ROUND_STEPS if args.mode == "reset" else 1
    for r in range(chunks):
        steps = STEPS // chunks
        train_private(model, site, sigma=SIGMA, clip=1.0, sample_rate=Q, steps=steps,
                      lr=cosine_lr(lr_max, lr_min, r * steps, STEPS), seed=args.seed * 1000 + r)
        print(f"{args.mode}: {(r + 1) * steps}/{STEPS} DP steps, {time.time() - t0:.0f}s", flush=True)
    model.eval()
    classifier = reference_classifier(data, args.out)
    g = torch.Generator().manual_seed(args.seed)
    agreement = [float((classifier.predict(model.sample(200, torch.full((200,), c), g).numpy()) == c).mean())
                 for c in range(run.num_classes)]
    print(f"{args.family} {args.mode}: class agreement per class {agreement} ({time.time() - t0:.0f}s)")
    save_png(args.out / f"{args.family}-{args.mode}.png", sample_grid(model, data.classes, 10, args.seed))


if __name__ == "__main__":
    main()
