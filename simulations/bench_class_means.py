"""Benchmark: what the class-mean release (round 0) does for each family, side by side, judged on validation data.

    python -m simulations.bench_class_means --family vae --epsilon 1 --class-mean-share 0 0.3 [--seed 0]
    python -m simulations.bench_class_means --family diffusion --epsilon 10 --class-mean-share 0.3 \\
        --guidance 1 1.5 3 --save /tmp/diffusion-prior

A fast stand-in for the federation that exercises the same parts without Flower: 4 sites (Dirichlet α = 0.5
over the bundled training split, as ``bench_release_table``), each training the family with the project's
DP trainer (``client.trainer.train_private``: Opacus, σ calibrated with PRV for the whole run on top of the
release), 20 rounds × 40 DP steps at q = 0.3, averaged uniformly after every round — what the ServerApp does,
minus SecAgg+ (whose quantization error is ~1e-6). With a share > 0 each site first releases its class means
(``privacy.class_means.release`` with the σ the site's plan would use) and their sum becomes the prior
(``Generator.set_class_means``). Every figure is computed on the sites' pooled local holdouts (20% of each
site; the bundled set stands in for public data), never on the test split: TSTR AUC with the report's
recipe (mean over its 3 classifier seeds), class agreement under the shipped classifier, FID / precision /
recall in its features. ``--guidance`` and ``--eta`` (diffusion) evaluate the same trained model at several
guidance scales and sampler stochasticities (sampling only: post-processing); ``--save DIR`` keeps each trained model's weights.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from client.data import load_dataset
from client.trainer import cosine_lr, train_private
from fedsynth.config import DEFAULT_DATA, RunConfig
from models import build_generator
from privacy.accountant import calibrate_sigma, epsilon as accounted_epsilon, steps_per_round
from privacy.class_means import means_of, noise_multiplier, release
from server.checkpoint import save_weights

from . import metrics as M
from .bench_floor import fidelity
from .partition import partition_sites
from .runner import reference_classifier

SITES, PARTITION = 4, "dirichlet:0.5"


def train_federated(family: str, eps: float, share: float, seed: int, sites, cfg: RunConfig,
                    model_kwargs: dict | None = None):
    """The family after ``cfg.rounds`` rounds of DP-SGD at every site (after the class-mean release when
    ``share`` > 0); returns (model, ε per site as accounted)."""
    torch.manual_seed(seed)
    model = build_generator(family, **(cfg.model_kwargs() | (model_kwargs or {})))
    lr, lr_final = model.default_lr
    steps = steps_per_round(cfg.local_epochs, cfg.sample_rate)
    total = steps * cfg.rounds
    prior = []
    if share > 0:
        sigma_m = noise_multiplier(share * eps, cfg.delta)
        parts = [release(s.images, s.labels, cfg.num_classes, sigma_m, cfg.coarse,
                         rng=np.random.default_rng(seed * 100 + i)) for i, s in enumerate(sites)]
        sums, counts = sum(p.sums for p in parts), sum(p.counts for p in parts)
        side = cfg.resolution // cfg.coarse
        model.set_class_means(torch.as_tensor(means_of(sums, counts), dtype=torch.float32).view(cfg.num_classes, cfg.channels, side,
                                                                                side))
        prior = [(sigma_m, 1.0, 1)]
    sigma = calibrate_sigma(eps, cfg.delta, cfg.sample_rate, total, prior=prior)
    for rnd in range(1, cfg.rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        states = []
        for i, site in enumerate(sites):
            model.load_state_dict(start)
            train_private(model, site, sigma=sigma, clip=cfg.clip, sample_rate=cfg.sample_rate, steps=steps,
                          lr=cosine_lr(lr, lr_final, (rnd - 1) * steps, total), seed=seed * 1000 + rnd * 10 + i)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in start})
        print(f"  round {rnd}/{cfg.rounds} done", flush=True)
    return model, accounted_epsilon(prior + [(sigma, cfg.sample_rate, total)], cfg.delta), sigma


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="vae", choices=["vae", "gan", "diffusion"])
    p.add_argument("--epsilon", type=float, default=10.0)
    p.add_argument("--class-mean-share", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, nargs="+", default=None, help="diffusion: guidance scales to sample at")
    p.add_argument("--eta", type=float, nargs="+", default=None,
                   help="diffusion: sampler stochasticity η to sample at (0: deterministic DDIM)")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model keyword arguments over the defaults (numbers), e.g. diversity=1")
    p.add_argument("--n", type=int, default=2000, help="synthetic images per evaluation")
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig(model=args.family)
    train = load_dataset(DEFAULT_DATA, "train")
    parts = partition_sites(train.labels, SITES, PARTITION, args.seed)
    sites = [train.subset(s.train) for s in parts]
    val = train.subset(np.concatenate([s.holdout for s in parts]))
    classifier = reference_classifier(train, DEFAULT_DATA.parent)
    labels = M.balanced_labels(args.n, cfg.num_classes, args.seed)
    extra = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.model)}
    for share in args.class_mean_share:
        t0 = time.time()
        model, eps, sigma = train_federated(args.family, args.epsilon, share, args.seed, sites, cfg, extra)
        if args.save:
            save_weights(args.save / f"{args.family}-eps{args.epsilon:g}-share{share:g}-seed{args.seed}.safetensors",
                         model.shared_weights())
        settings = [(g, e) for g in args.guidance or [getattr(model, "guidance", math.nan)]
                    for e in args.eta or [getattr(model, "eta", math.nan)]]
        for g, eta in settings:
            if not math.isnan(g):
                model.guidance, model.eta = g, eta
            syn = M.sample_images(model, labels, args.seed)
            tstr = M.train_and_test(syn, labels.numpy(), val.images, val.labels, cfg.num_classes, args.seed,
                                    n_boot=50)["auc"]["value"]
            pred = classifier.predict(syn)
            agree = [float((pred[labels.numpy() == c] == c).mean()) for c in range(cfg.num_classes)]
            fid = fidelity(classifier, syn, val.images, args.seed)
            print(f"RESULT {args.family} ε={args.epsilon:g} (accounted {eps:.3f}, DP-SGD σ={sigma:.3f}) "
                  f"class-mean-share={share:g} seed={args.seed}" + "".join(f" {kv}" for kv in args.model) + ("" if math.isnan(g) else f" guidance={g:g} η={eta:g}") +
                  f": val TSTR AUC {tstr:.3f}, agreement {' / '.join(f'{a:.0%}' for a in agree)}, FID {fid['fid']:.2f}, "
                  f"precision {fid['precision']:.3f}, recall {fid['recall']:.3f} [{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
