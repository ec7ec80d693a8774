"""``fedsynth evaluate``: the synthetic-data release report of a run folder — fidelity, utility, memorization,
membership inference and privacy side by side — written as ``report.json`` and a self-contained ``report.html``.

Real images come from the data file (the run's, or ``--data``): its test split (else val) is the held-out
reference no site trained on; the simulated sites' folders (``STATE_DIR/site-K/data.npz``) give the members
(each site's train part) and non-members (its local holdout). Features for fidelity are the penultimate layer
of the reference classifier (``simulations.runner.reference_classifier``). Deterministic for a seed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.data import ImageDataset, load_dataset, load_npz
from fedsynth.config import RunConfig
from models import Generator, build_generator
from models.classifier import SmallCNN
from server.checkpoint import atomic_write_bytes, load_weights, write_json

from . import metrics as M
from .generate import load_run
from .report_html import render_html, report_figures

DEFAULT_N = 2000          # synthetic images (capped at the real training split's size)
MIN_PER_CLASS = 10        # synthetic images per class, at least
MIN_REAL = 20             # held-out real images, at least (halves for the floor, k-NN balls)
ROUND_AGREEMENT_N = 100   # samples per class per checkpoint for agreement over rounds


@dataclass
class Inputs:
    run_dir: Path
    run: RunConfig
    model: Generator
    names: list[str]
    privacy: dict
    rounds: list[dict]
    agreement: dict | None
    train: ImageDataset
    test: ImageDataset
    test_split: str
    members: ImageDataset | None
    nonmembers: ImageDataset | None
    sites_note: str
    classifier: SmallCNN


def evaluate(run_dir: Path, data: Path | None = None, n: int | None = None, out: Path | None = None,
             seed: int | None = None) -> dict:
    """Write ``report.json`` and ``report.html`` into ``out`` (default: the run folder); returns the report."""
    run_dir = Path(run_dir)
    inputs = load_inputs(run_dir, Path(data) if data else None)
    seed = inputs.run.seed if seed is None else seed
    n = min(DEFAULT_N, len(inputs.train)) if n is None else n
    if n < MIN_PER_CLASS * len(inputs.names):
        raise ValueError(f"n (synthetic images) must be ≥ {MIN_PER_CLASS} per class "
                         f"({MIN_PER_CLASS * len(inputs.names)} for {len(inputs.names)} classes), got {n}")
    threads = torch.get_num_threads()
    # One thread: the same floating-point reduction order on any machine (a reproducible report), and on a
    # busy 2-core machine several times faster than two threads that fight for the cores.
    torch.set_num_threads(1)
    try:
        report, pictures = build_report(inputs, n, seed)
    finally:
        torch.set_num_threads(threads)
    out = Path(out) if out else run_dir
    write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.html", render_html(report, report_figures(pictures, report)).encode())
    return report


# --- inputs -----------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict | list:
    if not path.is_file():
        raise ValueError(f"{path}: missing; expected the run's {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def load_inputs(run_dir: Path, data: Path | None) -> Inputs:
    from .runner import reference_classifier  # the runner calls evaluate(): import late, no cycle

    model, names = load_run(run_dir)  # checks the folder, config.json and weights
    cfg = run_dir / "config.json"
    run = RunConfig.from_flower(_read_json(cfg, "config"), source=str(cfg))
    privacy = _read_json(run_dir / "privacy.json", "per-site privacy record")
    if not isinstance(privacy, dict) or not all(isinstance(v, dict) and "epsilon" in v for v in privacy.values()):
        raise ValueError(f"{run_dir / 'privacy.json'}: expected {{site: {{epsilon, delta, unit, ...}}}}")
    metrics = _read_json(run_dir / "metrics.json", "per-round metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds", []), list):
        raise ValueError(f"{run_dir / 'metrics.json'}: expected {{\"rounds\": [...], ...}}")
    rounds = metrics.get("rounds", [])
    agreement = _read_json(run_dir / "agreement.json", "") if (run_dir / "agreement.json").is_file() else None
    if data is None:
        data = run.data_file
        if not data.exists():
            raise ValueError(f"{cfg}: data-path {data} does not exist; pass --data PATH (the run's data file)")
    train = load_dataset(data, "train", run.resolution)
    if len(train.classes) != run.num_classes or train.channels != run.channels:
        raise ValueError(f"{data}: {len(train.classes)} classes × {train.channels} channels; the run in {cfg} "
                         f"has {run.num_classes} × {run.channels}")
    test_split, test = real_test_split(Path(data), run.resolution, run.num_classes)
    members, nonmembers, note = site_sets(run)
    classifier = reference_classifier(train, Path(run.state_dir))
    return Inputs(run_dir, run, model, names, privacy, rounds, agreement, train, test, test_split, members,
                  nonmembers, note, classifier)


def real_test_split(path: Path, resolution: int, num_classes: int) -> tuple[str, ImageDataset]:
    """The data file's test split, else its val split: real images that no site trained on."""
    if path.is_dir():
        raise ValueError(f"{path}: a class-per-folder data set has no held-out split; the report needs a .npz "
                         "with test_images/test_labels (or val_images/val_labels) — pass it with --data")
    with np.load(path, allow_pickle=False) as z:  # readable: load_dataset(train) has already opened it
        keys = set(z.files)
    for split in ("test", "val"):
        if {f"{split}_images", f"{split}_labels"} <= keys:
            test = load_npz(path, split, resolution, num_classes)
            if len(test) < MIN_REAL:
                raise ValueError(f"{path}: {split}_images holds {len(test)} images; the report needs at least "
                                 f"{MIN_REAL} held-out real images")
            return split, test
    raise ValueError(f"{path}: no test_images/test_labels (or val_images/val_labels); the report scores "
                     "synthetic images against real images that no site trained on")


def site_sets(run: RunConfig) -> tuple[ImageDataset | None, ImageDataset | None, str]:
    """Members (every site's train part) and non-members (every site's local holdout), or why there are none."""
    parts: dict[str, list[ImageDataset]] = {"train": [], "val": []}
    for k in range(run.sites):
        path = Path(run.state_dir) / f"site-{k}" / "data.npz"
        if not path.is_file():
            return None, None, f"{path}: missing (the sites' data stays at the sites outside a simulation)"
        with np.load(path, allow_pickle=False) as z:
            if "val_images" not in z.files:
                return None, None, f"{path}: the site has no local holdout (val split), so no non-members"
        for split in parts:
            parts[split].append(load_npz(path, split, run.resolution, run.num_classes))
    joined = [ImageDataset(np.concatenate([d.images for d in ds]), np.concatenate([d.labels for d in ds]),
                           ds[0].classes, f"{run.state_dir}/site-*/data.npz [{split}]")
              for split, ds in parts.items()]
    return joined[0], joined[1], f"{run.sites} site folders under {run.state_dir}"


# --- the report -------------------------------------------------------------------------------------------
def features(classifier: SmallCNN, images: np.ndarray, batch: int = 512) -> np.ndarray:
    with torch.no_grad():
        out = [classifier.features(torch.as_tensor(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy().astype(np.float64)


def build_report(inp: Inputs, n: int, seed: int) -> tuple[dict, dict]:
    """The report dict and the arrays its pictures need."""
    run, rng = inp.run, np.random.default_rng(seed)
    syn_labels = M.balanced_labels(n, run.num_classes, seed)
    syn = M.sample_images(inp.model, syn_labels, seed)
    syn_y = syn_labels.numpy()
    f_syn, f_test = features(inp.classifier, syn), features(inp.classifier, inp.test.images)
    report = {
        "run": {"run-id": run.run_id, "folder": str(inp.run_dir), "model": run.model, "rounds": run.rounds,
                "sites": run.sites, "secure-aggregation": run.secure},
        "evaluation": {"seed": seed, "n-synthetic": n, "data": inp.train.source, "real-reference-split": inp.test_split,
                       "n-real-reference": len(inp.test), "n-real-train": len(inp.train), "classes": inp.names,
                       "feature-network": "reference classifier (SmallCNN) penultimate layer, 64-d"},
        "privacy": privacy_section(inp.privacy),
        "fidelity": fidelity_section(f_syn, syn_y, f_test, inp.test.labels, inp.names, rng, seed),
        "utility": utility_section(syn, syn_y, inp.train, inp.test, run.num_classes, n, rng, seed),
        "agreement": {"final": inp.agreement, "over-rounds": agreement_over_rounds(inp, seed)},
    }
    pictures = {"synthetic": syn, "synthetic-labels": syn_y, "real": inp.test.images, "real-labels": inp.test.labels,
                "names": inp.names, "rounds": inp.rounds, "privacy": inp.privacy}
    if inp.members is None:
        report["memorization"] = report["membership-inference"] = {"skipped": inp.sites_note}
        return report, pictures
    mem, non = equal_sets(inp.members, inp.nonmembers, n, rng)
    report["memorization"], pictures["closest"] = memorization_section(
        syn, f_syn, mem, non, lambda x: features(inp.classifier, x), seed)
    report["membership-inference"] = M.membership_inference(
        inp.model, (mem.images, mem.labels), (non.images, non.labels), (syn, syn_y), seed=seed)
    report["membership-inference"]["sets"] = inp.sites_note
    return report, pictures


def privacy_section(privacy: dict) -> dict:
    eps = [float(p["epsilon"]) for p in privacy.values() if p.get("epsilon") is not None]
    return {"per-site": privacy, "max-epsilon": max(eps) if eps else None,
            "note": "each site's ε composed over every round and run in its ledger (privacy.json)"}


def fidelity_section(f_syn, y_syn, f_real, y_real, names, rng, seed) -> dict:
    halves = rng.permutation(len(f_real))
    h1, h2 = f_real[halves[: len(halves) // 2]], f_real[halves[len(halves) // 2:]]
    m = min(len(f_syn), len(f_real))  # precision/recall on equal-size sets (Kynkäänniemi et al.)
    pick = rng.choice(len(f_syn), m, replace=False)
    per_class = {}
    for c, name in enumerate(names):
        rc, sc = f_real[y_real == c], f_syn[y_syn == c]
        mc = min(len(rc), len(sc))
        if mc <= 3:
            per_class[name] = {"skipped": f"{len(rc)} real / {len(sc)} synthetic images of this class; need > 3"}
            continue
        per_class[name] = M.precision_recall(rc[rng.choice(len(rc), mc, replace=False)],
                                             sc[rng.choice(len(sc), mc, replace=False)], 3, seed=seed + c)
    return {
        "fid": M.fid_stat(f_syn, f_real, seed=seed),
        "kid": M.kid_stat(f_syn, f_real, seed=seed),
        "precision-recall": M.precision_recall(f_real[rng.permutation(len(f_real))[:m]], f_syn[pick], 3, seed=seed),
        "per-class": per_class,
        "real-floor": {"what": "the same statistics between two random halves of the real reference split",
                       "fid": M.fid_stat(h1, h2, seed=seed), "kid": M.kid_stat(h1, h2, seed=seed),
                       "precision-recall": M.precision_recall(h1, h2[: len(h1)], 3, seed=seed)},
    }


def utility_section(syn, y_syn, train, test, num_classes, n, rng, seed) -> dict:
    """TSTR next to TRTR and a noise control, all the same recipe and the same classifier seeds (so the same
    S initial networks), each figure the mean over the seeds (``metrics.seed_averaged``).

    The control matters: a network that learned nothing still ranks real X-rays by some image statistic that
    correlates with the label, so one seed's AUC can sit far from 0.5 (0.2–0.85 across seeds here). The mean
    over seeds is 0.5 in expectation, but with S = 3 it still lands outside [0.35, 0.65] for about 1 seed
    triple in 6; the control shows where these seeds' "nothing learned" lies, and its interval how sure that is.
    """
    real = train.subset(np.sort(rng.choice(len(train), min(n, len(train)), replace=False)))
    noise = rng.random(syn.shape, dtype=np.float32)
    run = lambda x, y: M.train_and_test(x, y, test.images, test.labels, num_classes, seed)  # noqa: E731
    return {"recipe": M.TSTR_RECIPE, "tstr": run(syn, y_syn), "trtr": run(real.images, real.labels),
            "noise-control": run(noise, y_syn),
            "note": f"Each figure is the mean over {M.TSTR_RECIPE['seeds']} classifier seeds (the same seeds for "
                    "all three rows); its 95% interval resamples both the seeds and the test images. TSTR: "
                    "trained on the synthetic images (balanced labels), tested on real; TRTR: trained on as "
                    "many real training images (up to n); noise control: trained on uniform noise with the "
                    "synthetic labels — where a classifier that learned nothing lands with these seeds"}


def equal_sets(members: ImageDataset, nonmembers: ImageDataset, n: int, rng) -> tuple[ImageDataset, ImageDataset]:
    m = min(len(members), len(nonmembers), n)
    return (members.subset(np.sort(rng.choice(len(members), m, replace=False))),
            nonmembers.subset(np.sort(rng.choice(len(nonmembers), m, replace=False))))


def memorization_section(syn, f_syn, mem: ImageDataset, non: ImageDataset, featurize, seed) -> tuple[dict, dict]:
    out, closest = {"n-synthetic": len(syn), "n-members": len(mem), "n-nonmembers": len(non),
                    "ideal": "closer-to-training ≈ 0.5: synthetic images no closer to training than to holdout"}, {}
    spaces = {"pixel": (syn, mem.images, non.images), "feature": (f_syn, featurize(mem.images), featurize(non.images))}
    for space, (s, a, b) in spaces.items():
        share, near = M.closer_to_training_stat(s, a, b, seed=seed)
        d_mem, d_non = near["d-members"], near["d-nonmembers"]
        out[space] = {"closer-to-training": share,
                      "dcr-training-median": float(np.median(d_mem)), "dcr-holdout-median": float(np.median(d_non)),
                      "dcr-training-p05": float(np.percentile(d_mem, 5)),
                      "dcr-holdout-p05": float(np.percentile(d_non, 5))}
        if space == "pixel":
            top = np.argsort(d_mem, kind="stable")[:8]
            closest = {"synthetic": syn[top], "training": mem.images[near["i-members"][top]],
                       "holdout": non.images[near["i-nonmembers"][top]], "distance": d_mem[top]}
    return out, closest


def agreement_over_rounds(inp: Inputs, seed: int) -> dict:
    """How often the reference classifier gives a checkpoint's class-c samples the label c, per round."""
    out = {}
    model = build_generator(inp.run.model, **inp.run.model_kwargs())
    labels = torch.arange(inp.run.num_classes).repeat_interleave(ROUND_AGREEMENT_N)
    for path in sorted((inp.run_dir / "checkpoints").glob("round-*.safetensors")):
        model.load_shared_weights(load_weights(path))
        model.eval()
        images = M.sample_images(model, labels, seed)
        out[str(int(path.stem.split("-")[1]))] = float((inp.classifier.predict(images) == labels.numpy()).mean())
    return {"samples-per-class": ROUND_AGREEMENT_N, "per-round": out}


def headline(report: dict) -> list[str]:
    """The few numbers a reader wants first, one per line (printed by the CLI and the runner)."""
    f, u = report["fidelity"], report["utility"]

    def s(x, spec=".3f"):
        ci = f" [{x['ci95'][0]:{spec}}, {x['ci95'][1]:{spec}}]" if "ci95" in x else ""
        return f"{x['value']:{spec}}{ci}"
    lines = [f"FID {s(f['fid'], '.3g')} (real-vs-real floor {s(f['real-floor']['fid'], '.3g')}), "
             f"KID {s(f['kid'], '.3g')} (floor {s(f['real-floor']['kid'], '.3g')}), precision "
             f"{s(f['precision-recall']['precision'])}, recall {s(f['precision-recall']['recall'])}",
             f"TSTR AUC {s(u['tstr']['auc'])} (n={u['tstr']['n-train']}) vs TRTR {s(u['trtr']['auc'])} "
             f"(n={u['trtr']['n-train']}), noise control {s(u['noise-control']['auc'])}: each the mean over "
             f"{u['tstr']['n-seeds']} classifier seeds, tested on {u['tstr']['n-test']} real images"]
    mem, mia = report["memorization"], report["membership-inference"]
    if "skipped" in mem:
        lines.append(f"memorization and membership inference skipped: {mem['skipped']}")
    else:
        wb = mia["white-box"]
        lines.append(f"closer to training than holdout: pixel {s(mem['pixel']['closer-to-training'])}, "
                     f"feature {s(mem['feature']['closer-to-training'])} (0.5 ideal); membership-inference AUC "
                     f"black-box {s(mia['black-box']['auc'])}"
                     + (f", white-box {s(wb['auc'])}" if "auc" in wb else "") + " (0.5 = no leak)")
    eps = report["privacy"]["max-epsilon"]
    lines.append(f"largest site ε {eps:.3g}" if eps is not None else "no site has spent any ε")
    for site, p in report["privacy"]["per-site"].items():  # fedsynth simulate --audit-canaries
        if "canary-audit" in p:
            c = p["canary-audit"]
            lines.append(f"{site} canary audit: empirical ε ≥ {c['epsilon-lower-bound']:.3f} vs accounted "
                         f"{c['epsilon-accounted-this-run']:.3f} this run"
                         + (" — WARNING: ABOVE THE ACCOUNTED ε" if c["exceeds-accounted"] else ""))
    return lines
