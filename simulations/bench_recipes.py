"""Benchmark: DP generator recipes side by side on one simulated site of the bundled data (ε=10, δ=1e-5).

``python -m simulations.bench_recipes [--family vae|gan|diffusion] [--only TEXT] [--site-size 1250]
[--seeds 0]`` prints, per recipe: σ, the
private training throughput (1 thread, as a simulated site gets), and class agreement — how often the
shipped reference classifier (trained on real training images) labels a sample of class c as c. Only the
training split is used: the test split stays untouched for the release report.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from client.data import load_dataset
from client.trainer import cosine_lr, train_private
from fedsynth.config import DEFAULT_DATA
from models import build_generator
from privacy.accountant import calibrate_sigma

from .runner import reference_classifier

# family -> name: (model kwargs, q, steps, lr_max, lr_min)
VAE_RECIPES = {
    "conv decoder, Adam 2e-3 (baseline-like)": (dict(latent_dim=16, width=32), 0.1, 90, 2e-3, 2e-3),
    "linear decoder, Adam 1e-2": (dict(latent_dim=16, width=0, coarse=1), 0.1, 90, 1e-2, 1e-2),
    "linear half-res decoder, q=0.5, Adam 3e-3": (dict(latent_dim=16, width=0, coarse=2), 0.5, 300, 3e-3, 3e-3),
    "linear half-res, latent 4, q=0.3, 400 steps, cosine 2e-2→5e-4": (
        dict(latent_dim=4, width=0, coarse=2), 0.3, 400, 2e-2, 5e-4),
    "linear half-res, latent 4, q=0.3, 800 steps, cosine 2e-2→5e-4 (default)": (
        dict(latent_dim=4, width=0, coarse=2), 0.3, 800, 2e-2, 5e-4),
    "linear half-res, latent 8, q=0.5, cosine 2e-2→5e-4": (dict(latent_dim=8, width=0, coarse=2), 0.5, 300, 2e-2, 5e-4),
}
GAN_RECIPES = {
    "full res, q=0.3, 800 D steps, cosine 2e-3→2e-4": (dict(coarse=1), 0.3, 800, 2e-3, 2e-4),
    "half res, q=0.3, 800 D steps, cosine 2e-3→2e-4 (default)": (dict(coarse=2), 0.3, 800, 2e-3, 2e-4),
}
DIFFUSION_RECIPES = {
    "full res, eps-prediction, width 16, K=4, q=0.1, 300 steps": (
        dict(coarse=1, prediction="eps", unet_width=16), 0.1, 300, 2e-3, 1e-4),
    "half res, x0-prediction, width 8, K=4, q=0.3, 800 steps (default)": (
        dict(coarse=2, prediction="x0", unet_width=8), 0.3, 800, 2e-3, 1e-4),
}
RECIPES = {"vae": VAE_RECIPES, "gan": GAN_RECIPES, "diffusion": DIFFUSION_RECIPES}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(RECIPES), default="vae")
    p.add_argument("--only", default="", help="run only the recipes whose name contains this text")
    p.add_argument("--site-size", type=int, default=1250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epsilon", type=float, default=10.0)
    args = p.parse_args()
    full = load_dataset(DEFAULT_DATA, "train")
    classifier = reference_classifier(full, DEFAULT_DATA.parent)
    print(f"{'recipe':<64} {'σ':>6} {'img/s':>7} {'agreement (normal, pneumonia)':>32}")
    for name, (kwargs, q, steps, lr_max, lr_min) in RECIPES[args.family].items():
        if args.only not in name:
            continue
        sigma = calibrate_sigma(args.epsilon, 1e-5, q, steps)
        agreements, speeds = [], []
        for seed in args.seeds:
            torch.set_num_threads(1)
            site = full.subset(np.random.default_rng(seed).permutation(len(full))[:args.site_size])
            torch.manual_seed(seed)
            model = build_generator(args.family, num_classes=2, **kwargs)
            t0 = time.time()
            train_private(model, site, sigma=sigma, clip=1.0, sample_rate=q, steps=steps,
                          lr=cosine_lr(lr_max, lr_min, 0, steps), seed=seed)
            speeds.append(q * len(site) * steps / (time.time() - t0))
            g = torch.Generator().manual_seed(seed)
            agreements.append([float((classifier.predict(model.sample(500, torch.full((500,), c), g).numpy()) == c)
                                     .mean()) for c in (0, 1)])
        a = np.array(agreements)
        print(f"{name:<64} {sigma:>6.2f} {np.mean(speeds):>7.0f} "
              f"{a.mean():>8.1%} ({a[:, 0].mean():.1%}, {a[:, 1].mean():.1%}) ± {a.mean(1).std():.1%}", flush=True)


if __name__ == "__main__":
    main()
