"""The release report's statistics: small numpy/torch functions, each result with its sample counts and,
where it is a statistic, a 95% percentile-bootstrap interval.

Every result is a plain dict ``{"value": x, "ci95": [lo, hi], "n": ...}`` (``n-a``/``n-b`` for two-sample
statistics) so the report can print any of them the same way. Everything is deterministic for a seed.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from models.base import Generator
from models.classifier import SmallCNN, train_classifier

N_BOOT = 500
# The TSTR/TRTR recipe, fixed in advance on the val split (never on test): `python -m simulations.choose_tstr_recipe`.
# SmallCNN with input centred on public constants, (x − 0.5) / 0.25, batch 64, Adam 2e-3, 5 epochs. The earlier
# recipe (raw [0, 1] input, 3 epochs) stopped inside the plateau raw input leaves the first epochs on: at n = 2000
# it scored val AUC 0.899 ± 0.085 over 5 seeds (val loss 0.48 ± 0.18, near ln 2), so it measured how soon a seed
# left the plateau as much as the images. Centred, 5 epochs: val AUC 0.990 ± 0.002 (best seen, 12 epochs: 0.995);
# raw input needs 8 epochs for the same. The rule: the cheapest setting within 0.005 of the best val AUC, seed
# sd < 0.01.
# "seeds": every figure is the mean over this many classifier seeds: a net trained on uniform noise still ranks
# X-rays by some image statistic, with a sign set by its seed (val AUC sd ≈ 0.2 over seeds for either input), so a
# one-seed control is a coin toss; 3 seeds cut that sd to ~0.12 (1/√S) at 3× the training time (~15 s per net
# on 2000 images, one CPU thread).
TSTR_RECIPE = {"model": "SmallCNN (models/classifier.py), input centred (x - 0.5) / 0.25", "epochs": 5,
               "batch-size": 64, "lr": 2e-3, "centred": True, "sampling": "class-balanced", "seeds": 3}


def stat(value: float, ci: tuple[float, float] | None = None, **counts) -> dict:
    out = {"value": float(value)}
    if ci is not None:
        out["ci95"] = [float(ci[0]), float(ci[1])]
    return out | {k.replace("_", "-"): int(v) for k, v in counts.items()}


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def mean_stat(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The mean of per-item values (0/1 indicators, shares) with a bootstrap interval over the items."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return stat(values.mean(), percentile_ci(boots), n=len(values))


# --- ranks -------------------------------------------------------------------------------------------
def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by ranks (Mann–Whitney U; ties count half): P(score⁺ > score⁻)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"auc: needs both positives and negatives, got {n1} and {n0}")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_stat(scores: np.ndarray, positive: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """AUC with a stratified bootstrap interval (positives and negatives resampled separately)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    rng = np.random.default_rng(seed)
    flags = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    boots = [auc(np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]], flags)
             for _ in range(n_boot)]
    return stat(auc(scores, positive), percentile_ci(boots), n_positive=len(pos), n_negative=len(neg))


def classifier_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary: AUC of P(class 1). More classes: the mean one-vs-rest AUC over classes present in ``labels``."""
    if probs.shape[1] == 2:
        return auc(probs[:, 1], labels == 1)
    present = [c for c in range(probs.shape[1]) if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean([auc(probs[:, c], labels == c) for c in present]))


# --- fidelity in a feature space -----------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between Gaussians fitted to two feature sets (rows = samples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((ΣaΣb)^½) = Σ √λ over the eigenvalues of ΣaΣb (real and ≥ 0: it is similar to a PSD matrix)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace, 0.0))


def fid_stat(a: np.ndarray, b: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict:
    """FID with a bootstrap interval over both sets. FID is biased upwards at small n, and more so on a
    resample (its copies lower the effective n), so the interval is re-centred on the estimate (bootstrap
    bias correction). Compare FIDs only at like n; KID is the unbiased one."""
    rng = np.random.default_rng(seed)
    value = frechet_distance(a, b)
    boots = np.array([frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
                      for _ in range(n_boot)])
    lo, hi = percentile_ci(boots - (boots.mean() - value))
    return stat(value, (max(lo, 0.0), hi), n_a=len(a), n_b=len(b))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_weighted(kaa: np.ndarray, kbb: np.ndarray, kab: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for many samples at once, each given as per-point counts (rows of ``wa``/``wb``): a subset
    is a 0/1 row, a bootstrap resample a row of multiplicities. Within a set, only pairs of *different* points
    count (Σ = wᵀKw − Σᵢ wᵢ²Kᵢᵢ over m² − Σᵢ wᵢ² pairs): a copy paired with itself would bias it upwards."""
    def within(k, w):
        return (((w @ k) * w).sum(1) - (w * w) @ np.diag(k)) / (w.sum(1) ** 2 - (w * w).sum(1))
    return within(kaa, wa) + within(kbb, wb) - 2 * ((wa @ kab) * wb).sum(1) / (wa.sum(1) * wb.sum(1))


def kid_stat(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 1000, n_boot: int = 200,
             seed: int = 0) -> dict:
    """Kernel Inception Distance: unbiased MMD² with the cubic polynomial kernel (Bińkowski et al. 2018).

    ``value`` uses all samples; ``std`` is over random subsets of ``subset_size`` (the usual KID ± std);
    ``ci95`` is a bootstrap over both sets. Unbiased, so comparable across sample sizes (and can be < 0).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"kid: needs at least 2 samples per set, got {len(a)} and {len(b)}")
    kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    sub_a, sub_b = np.zeros((subsets, len(a))), np.zeros((subsets, len(b)))
    for r in range(subsets):
        sub_a[r, rng.choice(len(a), m, replace=False)] = 1
        sub_b[r, rng.choice(len(b), m, replace=False)] = 1
    boot_a = np.stack([np.bincount(rng.integers(0, len(a), len(a)), minlength=len(a)) for _ in range(n_boot)])
    boot_b = np.stack([np.bincount(rng.integers(0, len(b), len(b)), minlength=len(b)) for _ in range(n_boot)])
    full = _mmd2_weighted(kaa, kbb, kab, np.ones((1, len(a))), np.ones((1, len(b))))[0]
    parts = _mmd2_weighted(kaa, kbb, kab, sub_a, sub_b)
    boots = _mmd2_weighted(kaa, kbb, kab, boot_a.astype(np.float64), boot_b.astype(np.float64))
    out = stat(full, percentile_ci(boots), n_a=len(a), n_b=len(b))
    return out | {"std": float(np.std(parts)), "subsets": subsets, "subset-size": m}


# --- nearest neighbours ----------------------------------------------------------------------------------
def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances in float64: in float32 the matrix-product shortcut loses ~1e-2 on 784 pixels, and an
    exact copy of a training image would not read as distance 0."""
    return torch.cdist(a.double(), b.double())


def nearest(queries: np.ndarray, refs: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest row of ``refs``, and that row's index."""
    q = torch.as_tensor(np.asarray(queries, np.float32).reshape(len(queries), -1))
    r = torch.as_tensor(np.asarray(refs, np.float32).reshape(len(refs), -1))
    dist, idx = [], []
    for i in range(0, len(q), batch):
        d, j = _cdist(q[i:i + batch], r).min(1)
        dist.append(d), idx.append(j)
    return torch.cat(dist).numpy().astype(np.float64), torch.cat(idx).numpy()


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest *other* row."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii: need more than k={k} samples, got {len(x)}")
    t = torch.as_tensor(np.asarray(x, np.float32))
    return _cdist(t, t).topk(k + 1, dim=1, largest=False).values[:, k].numpy().astype(np.float64)


def within_manifold(queries: np.ndarray, support: np.ndarray, k: int = 3) -> np.ndarray:
    """1 where a query lies inside some support point's k-NN ball (Kynkäänniemi et al. 2019), else 0."""
    radii = torch.as_tensor(knn_radii(support, k))
    d = _cdist(torch.as_tensor(np.asarray(queries, np.float32)), torch.as_tensor(np.asarray(support, np.float32)))
    return (d.double() <= radii[None, :]).any(1).numpy().astype(np.float64)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, n_boot: int = N_BOOT,
                     seed: int = 0) -> dict:
    """Precision: share of fake samples on the real manifold; recall: share of real samples on the fake one.

    The intervals resample the queries with each manifold held fixed.
    """
    precision = mean_stat(within_manifold(fake, real, k), n_boot, seed)
    recall = mean_stat(within_manifold(real, fake, k), n_boot, seed + 1)
    return {"precision": precision, "recall": recall, "k": k, "n-real": len(real), "n-fake": len(fake)}


# --- memorization: distance to closest record -------------------------------------------------------------
def closer_to_training(d_members: np.ndarray, d_nonmembers: np.ndarray) -> np.ndarray:
    """Per synthetic image: 1 if its nearest member is closer than its nearest non-member, 0.5 on a tie."""
    return np.where(d_members < d_nonmembers, 1.0, np.where(d_members == d_nonmembers, 0.5, 0.0))


def closer_to_training_stat(synthetic: np.ndarray, members: np.ndarray, nonmembers: np.ndarray,
                            n_boot: int = 200, seed: int = 0) -> tuple[dict, dict]:
    """Share of synthetic images nearer to a member than to any non-member (0.5 when nothing is memorized).

    The interval resamples the synthetic images *and* both reference sets: when the samples are alike (an
    early, blurry model) one lucky reference image decides the share for all of them, and only resampling
    the references shows that. Returns the statistic and each synthetic image's nearest distances/indices.
    """
    flat = lambda x: torch.as_tensor(np.asarray(x, np.float32).reshape(len(x), -1))  # noqa: E731
    s = flat(synthetic)
    near, resampled_min = {}, {}
    for name, refs in (("members", members), ("nonmembers", nonmembers)):
        d = _cdist(s, flat(refs))
        near[f"d-{name}"], near[f"i-{name}"] = (t.numpy() for t in d.min(1))
        resampled_min[name] = _resampled_min(d.numpy())
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = rng.integers(0, len(s), len(s))
        boots.append(closer_to_training(resampled_min["members"](rng)[rows],
                                        resampled_min["nonmembers"](rng)[rows]).mean())
    dm, dn = near["d-members"], near["d-nonmembers"]
    result = stat(closer_to_training(dm, dn).mean(), percentile_ci(boots), n_synthetic=len(s),
                  n_members=len(members), n_nonmembers=len(nonmembers))
    return result, near


def _resampled_min(d: np.ndarray, k: int = 32):
    """``draw(rng)``: each row's minimum over a bootstrap resample of the columns, from the k smallest per row
    (a resample misses all k with probability ≈ 0.37^k; then the full row is used)."""
    k = min(k, d.shape[1])
    order = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.tile(np.arange(k), (len(d), 1))
    order = np.take_along_axis(order, np.argsort(np.take_along_axis(d, order, 1), 1), 1)
    values = np.take_along_axis(d, order, 1)

    def draw(rng) -> np.ndarray:
        chosen = np.zeros(d.shape[1], bool)
        chosen[rng.integers(0, d.shape[1], d.shape[1])] = True
        hit = chosen[order]
        out = values[np.arange(len(d)), hit.argmax(1)]
        for row in np.flatnonzero(~hit.any(1)):
            out[row] = d[row, chosen].min()
        return out
    return draw


# --- utility: train on synthetic, test on real -------------------------------------------------------------
@torch.no_grad()
def class_probabilities(model: SmallCNN, images: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(torch.as_tensor(images[i:i + batch])), 1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy().astype(np.float64)


def classifier_seeds(seed: int, n_seeds: int) -> list[int]:
    """The training seeds behind one figure: disjoint for different ``seed``s, and ``[seed]`` when S = 1."""
    return [seed * n_seeds + k for k in range(n_seeds)]


def train_and_test(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                   test_labels: np.ndarray, num_classes: int, seed: int = 0, n_boot: int = N_BOOT,
                   epochs: int = TSTR_RECIPE["epochs"], n_seeds: int = TSTR_RECIPE["seeds"]) -> dict:
    """The fixed recipe trained ``n_seeds`` times (one net per classifier seed) on one labelled set and scored
    on a real test set: AUC, accuracy and balanced accuracy, each the mean over the seeds, with a 95% interval
    (see ``seed_averaged``) and each seed's own figures under ``per-seed``."""
    seeds = classifier_seeds(seed, n_seeds)
    probs = np.stack([class_probabilities(train_classifier(train_images, train_labels, num_classes, epochs=epochs,
                                                           seed=s, batch_size=TSTR_RECIPE["batch-size"],
                                                           lr=TSTR_RECIPE["lr"], centred=TSTR_RECIPE["centred"]),
                                          test_images) for s in seeds])
    out = seed_averaged(probs, np.asarray(test_labels), seeds, n_boot, seed)
    return out | {"n-train": len(train_labels), "n-test": len(test_labels), "epochs": epochs}


def _figures(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC, accuracy and balanced accuracy (mean recall over the classes present: 1/C at chance, whatever the
    prevalence) of one net's class probabilities."""
    pred = probs.argmax(1)
    return np.array([classifier_auc(probs, labels), (pred == labels).mean(), _balanced_accuracy(pred, labels)])


def seed_averaged(probs: np.ndarray, labels: np.ndarray, seeds: list[int], n_boot: int = N_BOOT,
                  seed: int = 0) -> dict:
    """Each figure as the mean over S nets' figures (``probs``: S × test images × classes), not the figure of
    their averaged outputs (an ensemble), because of what a net that learned nothing does: its output is
    near-constant, but its tiny variation still ranks real X-rays by an image statistic that separates the
    classes, with a sign set by its seed. On the val split, nets trained on noise gave AUCs 0.21-0.82 by seed;
    the mean of per-seed AUCs is 0.5 in expectation (swapping the two labels maps one training run onto an
    equally likely one) and tightens as 1/√S, whereas averaging outputs only adds such ranking functions, whose
    sum ranks by the same kind of statistic: all 9 nets averaged still gave 0.27-0.47, and for 3 nets the
    ensemble AUC left [0.35, 0.65] about twice as often as the mean (37-50% vs 13-19% of seed triples).

    The interval is a two-level percentile bootstrap, so it covers both the test sample and the seed-to-seed
    spread: each replicate draws S of the nets with replacement and resamples the test images within each
    class (so every class stays present, as in ``auc_stat``), and averages the drawn nets' figures on those
    images. With S = 3 the seed level is crude (it can't show a spread the 3 seeds happen not to have), so
    ``per-seed`` lists every net's own figures.
    """
    per_seed = np.stack([_figures(p, labels) for p in probs])
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    boots = np.empty((n_boot, 3))
    for b in range(n_boot):
        nets = np.bincount(rng.integers(0, len(probs), len(probs)), minlength=len(probs))
        rows = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
        boots[b] = sum(k * _figures(probs[i][rows], labels[rows]) for i, k in enumerate(nets) if k) / len(probs)
    if probs.shape[2] == 2:
        auc_counts = {"n_positive": int((labels == 1).sum()), "n_negative": int((labels != 1).sum())}
    else:
        auc_counts = {"n": len(labels)}
    names = ("auc", "accuracy", "balanced-accuracy")
    out = {name: stat(per_seed[:, i].mean(), percentile_ci(boots[:, i]), n_seeds=len(probs),
                      **(auc_counts if name == "auc" else {"n": len(labels)})) for i, name in enumerate(names)}
    out["per-seed"] = [{"seed": s} | {name: float(v) for name, v in zip(names, row)}
                       for s, row in zip(seeds, per_seed)]
    return out | {"n-seeds": len(probs)}


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))


# --- membership inference ----------------------------------------------------------------------------------
def blackbox_mia_scores(queries: np.ndarray, query_labels: np.ndarray, samples: np.ndarray,
                        sample_labels: np.ndarray) -> np.ndarray:
    """GAN-Leaks (full black-box): score = −(pixel distance to the closest generated sample of the same class)."""
    scores = np.full(len(queries), -np.inf)
    for c in np.unique(query_labels):
        q, s = query_labels == c, sample_labels == c
        if s.any():
            scores[q] = -nearest(queries[q], samples[s])[0]
    return scores


def whitebox_mia_scores(model: Generator, images: np.ndarray, labels: np.ndarray, draws: int = 4,
                        seed: int = 0, batch: int = 1000) -> np.ndarray:
    """Score = −(the model's own per-image loss), averaged over ``draws`` of its noise (VAE: −ELBO)."""
    x, y = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels).long()
    total = torch.zeros(len(x), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model.eval()
        for _ in range(draws):
            total += torch.cat([model.loss(x[i:i + batch], y[i:i + batch]).double().reshape(-1)
                                for i in range(0, len(x), batch)])
    return -(total / draws).numpy()


def balanced_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """``n`` labels with every class equally often (±1), in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def sample_images(model: Generator, labels: torch.Tensor, seed: int, batch: int = 1000) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = [model.sample(len(y), y, generator=g) for y in labels.split(batch)]
    return torch.cat(out).clamp(0, 1).numpy().astype(np.float32)


def membership_inference(model: Generator, members: tuple[np.ndarray, np.ndarray],
                         nonmembers: tuple[np.ndarray, np.ndarray], samples: tuple[np.ndarray, np.ndarray],
                         seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """AUC of telling members from non-members: black-box against generated ``samples``, and white-box with the
    model's own loss where the family defines one. Each argument is a pair (images, labels)."""
    images = np.concatenate([members[0], nonmembers[0]])
    labels = np.concatenate([members[1], nonmembers[1]])
    is_member = np.r_[np.ones(len(members[1]), bool), np.zeros(len(nonmembers[1]), bool)]
    out = {"n-members": len(members[1]), "n-nonmembers": len(nonmembers[1]),
           "black-box": {"attack": "GAN-Leaks full black-box: −pixel distance to the closest same-class sample",
                         "generated-samples": len(samples[1]),
                         "auc": auc_stat(blackbox_mia_scores(images, labels, *samples), is_member, n_boot, seed)}}
    try:
        scores = whitebox_mia_scores(model, images, labels, seed=seed)
    except NotImplementedError as exc:
        out["white-box"] = {"skipped": f"{model.family}: no per-image loss ({exc})"}
    else:
        out["white-box"] = {"attack": f"−loss(x, y) of the released {model.family} (mean of 4 calls: a loss may "
                                      "draw noise)",
                            "auc": auc_stat(scores, is_member, n_boot, seed)}
    return out
