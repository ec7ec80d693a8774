"""Benchmark: the DP-PCA floor (issue 9) on the bundled data, 4 sites, Dirichlet α = 0.5, δ = 1e-5.

``python -m simulations.bench_floor [--seeds 0] [--n 2000] [--components 0 4 16]`` releases, for each ε per
site ∈ {1, 10, ∞} and each number of components k, the sites' noisy moments (models/dp_pca.py), fits the
floor generator, and scores it with the release report's own metric functions (simulations/metrics.py):

- k is chosen per ε on a validation set drawn from the TRAINING split — the sites' local holdouts (20% of each
  site, as in a simulation) — by TSTR AUC; the test split is used only for the figures of the chosen k.
- FID and precision/recall in the shipped reference classifier's 64-d features, against the real test split.
- TSTR AUC: the report's fixed classifier recipe (``metrics.TSTR_RECIPE``, its figure the mean over the
  recipe's classifier seeds) trained on n balanced samples, tested on the real test split; beside it TRTR
  (n real training images) and the noise control, same recipe and seed.

Choosing k by validation looks at private data (the holdouts are site data): here the bundled set stands in for
public data. The clip norm, budget shares and pooling are fixed in advance (models/dp_pca.py).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from client.data import load_dataset
from fedsynth.config import DEFAULT_DATA
from models.dp_pca import fit_federated

from . import metrics as M
from .partition import partition_sites
from .report import features
from .runner import reference_classifier

DELTA, SITES, PARTITION = 1e-5, 4, "dirichlet:0.5"


def fidelity(classifier, syn: np.ndarray, real: np.ndarray, seed: int) -> dict:
    """FID on all samples, precision/recall on equal-size sets (as the release report computes them)."""
    f_syn, f_real = features(classifier, syn), features(classifier, real)
    m = min(len(f_syn), len(f_real))
    rng = np.random.default_rng(seed)
    pr = M.precision_recall(f_real[rng.permutation(len(f_real))[:m]], f_syn[rng.choice(len(f_syn), m, replace=False)],
                            3, seed=seed)
    return {"fid": M.frechet_distance(f_syn, f_real), "precision": pr["precision"]["value"],
            "recall": pr["recall"]["value"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n", type=int, default=2000, help="synthetic images per evaluation (balanced labels)")
    p.add_argument("--components", type=int, nargs="+", default=[0, 4, 16])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0, float("inf")])
    args = p.parse_args()
    torch.set_num_threads(1)  # the report's setting: reproducible, and faster on a busy 2-core machine
    t_start = time.time()
    train, test = load_dataset(DEFAULT_DATA, "train"), load_dataset(DEFAULT_DATA, "test")
    classifier = reference_classifier(train, DEFAULT_DATA.parent)
    rows = {}
    for seed in args.seeds:
        parts = partition_sites(train.labels, SITES, PARTITION, seed)
        sites = [(train.images[s.train], train.labels[s.train]) for s in parts]
        val = train.subset(np.concatenate([s.holdout for s in parts]))
        labels = M.balanced_labels(args.n, len(train.classes), seed)
        tstr = lambda x, y, ds: M.train_and_test(x, y, ds.images, ds.labels, len(train.classes), seed,  # noqa: E731
                                                 n_boot=100)["auc"]["value"]
        for eps in args.epsilons:
            t0 = time.time()
            val_auc = {}
            for k in args.components:
                model, release = fit_federated(sites, len(train.classes), eps, DELTA, k, seed=seed)
                val_auc[k] = tstr(M.sample_images(model, labels, seed), labels.numpy(), val)
            k = max(val_auc, key=val_auc.get)
            model, release = fit_federated(sites, len(train.classes), eps, DELTA, k, seed=seed)
            syn = M.sample_images(model, labels, seed)
            row = fidelity(classifier, syn, test.images, seed) | {
                "k": k, "live": "/".join(str(int(v)) for v in (model.variances > 0).sum(1)), "val-auc": val_auc,
                "tstr": tstr(syn, labels.numpy(), test),
                "sigma": release.sites[0]["sigma"], "epsilon": max(s["epsilon"] for s in release.sites),
                "seconds": time.time() - t0}
            rows.setdefault(eps, []).append(row)
            print(f"seed {seed} ε={eps:g}: validation TSTR AUC by k {({k: round(v, 3) for k, v in val_auc.items()})}"
                  f" → k={k} (components with λ > 0 per class: {row['live']}); σ={row['sigma']:.2f}, "
                  f"ε accounted (PRV)={row['epsilon']:.3f}; test: FID {row['fid']:.2f}, precision "
                  f"{row['precision']:.3f}, recall {row['recall']:.3f}, TSTR AUC {row['tstr']:.3f}", flush=True)
        real = train.subset(np.sort(np.random.default_rng(seed).choice(len(train), args.n, replace=False)))
        noise = np.random.default_rng(seed).random((args.n, *train.images.shape[1:]), dtype=np.float32)
        rows.setdefault("trtr", []).append({"tstr": tstr(real.images, real.labels, test)}
                                           | fidelity(classifier, real.images, test.images, seed))
        rows.setdefault("noise", []).append({"tstr": tstr(noise, labels.numpy(), test)}
                                            | fidelity(classifier, noise, test.images, seed))
        print(f"seed {seed}: TRTR {rows['trtr'][-1]}, noise control {rows['noise'][-1]}", flush=True)

    def cell(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}}" + (f" ± {np.std(values, ddof=1):{fmt}}" if len(values) > 1 else "")

    print(f"\n{len(args.seeds)} seed(s), n = {args.n} samples vs {len(test)} real test images; 4 sites, "
          f"Dirichlet α = 0.5, δ = {DELTA:g}")
    print(f"{'setting':<28} {'k (λ>0 per class)':>26} {'σ':>6} {'FID':>14} {'precision':>14} {'recall':>14} "
          f"{'TSTR AUC':>14}")
    for key, rs in rows.items():
        names = {"trtr": "real training images (TRTR)", "noise": "uniform noise (control)"}
        name = names[key] if key in names else f"DP-PCA floor, ε = {key:g}"
        ks = "" if "k" not in rs[0] else ",".join(f"{r['k']}({r['live']})" for r in rs)
        sigma = "" if "sigma" not in rs[0] else f"{rs[0]['sigma']:.2f}"
        print(f"{name:<28} {ks:>26} {sigma:>6} {cell([r['fid'] for r in rs], '.2f'):>14} "
              f"{cell([r['precision'] for r in rs], '.3f'):>14} {cell([r['recall'] for r in rs], '.3f'):>14} "
              f"{cell([r['tstr'] for r in rs], '.3f'):>14}")
    print(f"wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
