"""``fedsynth simulate``: N simulated hospitals on one machine through Flower's Simulation Engine (Ray).

The runner plays the part of the hospitals' IT: it splits one data set into per-site folders
(``STATE_DIR/site-K/data.npz``, train + local holdout), then starts the real ServerApp and ClientApps.
Each site's ledger lives beside its data and survives across runs that share ``--state-dir``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.data import ImageDataset, load_dataset, save_npz
from fedsynth.config import RunConfig, resolve_device
from models import build_generator
from models.classifier import SmallCNN, train_classifier
from server.checkpoint import load_weights, save_weights, write_json

from .canaries import plant_canaries, run_canary_audit
from .partition import partition_sites, partition_table

log = logging.getLogger("fedsynth.simulate")


def prepare_sites(run: RunConfig, data: ImageDataset | None = None) -> str:
    """Write each simulated hospital's folder; returns the partition table. Deterministic for a seed.

    A state folder is a fixed set of hospitals: its split is recorded in ``partition.json`` and a later
    run with another data file or split is refused — moving images between sites would leave them
    outside every ledger that bounds their privacy loss.
    """
    data = data or load_dataset(run.data_file, "train", run.resolution)
    split = {"data-sha256": classifier_key(data), "sites": run.sites, "partition": run.partition,
             "seed": run.seed, "holdout-fraction": run.holdout_fraction, "resolution": run.resolution}
    record = Path(run.state_dir) / "partition.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != split:
            changed = sorted(k for k in split if previous.get(k) != split[k])
            raise ValueError(f"{record}: these simulated hospitals were split with {previous}; this run asks "
                             f"for different {changed}. Use a new --state-dir, or the same data and split.")
    parts = partition_sites(data.labels, run.sites, run.partition, run.seed, run.holdout_fraction,
                            groups=data.patient_ids)  # with patient ids: whole patients per site and side
    for k, part in enumerate(parts):
        target = Path(run.state_dir) / f"site-{k}" / "data.npz"
        if not target.exists():
            holdout = data.subset(part.holdout) if len(part.holdout) else None
            save_npz(target, data.subset(part.train), holdout)
    write_json(record, split)
    return partition_table(data.labels, parts, data.classes)


def simulate(run: RunConfig, class_names: list[str] | None = None, *, resume: bool = False, client_app=None,
             reports: bool = True) -> Path:
    """Run a whole simulated federation; returns the run folder.

    ``resume``: continue ``run`` from its run folder's last complete checkpoint (see ``resume_simulation``).
    ``client_app``: another ClientApp for the sites (tests: a site that sends a corrupted update).
    ``reports``: False skips the class agreement and the release report (benchmarks, robustness tests).
    """
    from flwr.simulation import run_simulation  # imported late: Flower pulls in Ray

    logging.getLogger("flwr").propagate = False  # Flower has its own console handler: print each line once

    from client.client_app import app as site_app
    from server.server_app import make_server_app

    client_app = client_app or site_app

    # Ray workers may start elsewhere: every path they see must be absolute.
    run = run.replace(state_dir=str(Path(run.state_dir).resolve()), out_dir=str(Path(run.out_dir).resolve()),
                      data_path=str(run.data_file.resolve()))
    data = load_dataset(run.data_file, "train", run.resolution)
    run = run.replace(num_classes=len(data.classes), channels=data.channels)
    names = class_names or data.classes
    print(f"data: {run.data_file} ({len(data)} training images, classes {names})")
    print(partition_table_header(run))
    print(prepare_sites(run, data))
    plant_canaries(run)  # --audit-canaries M: site-0's canaries for this run (simulations/canaries.py)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")  # Ray's socket paths must stay short
    t0 = time.time()
    try:
        run_simulation(
            server_app=make_server_app(run, names, resume), client_app=client_app, num_supernodes=run.sites,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpu_share(run)},
                            "init_args": {"include_dashboard": False, "num_cpus": max(1, os.cpu_count() or 1),
                                          "_temp_dir": ray_tmp, "logging_level": logging.ERROR,
                                          "log_to_driver": False}})
    finally:
        _shutdown_ray()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    seconds = time.time() - t0
    if not reports:
        return run.run_dir
    report_agreement(run, data, names, seconds)
    run_canary_audit(run)  # before the release report, which reads privacy.json
    write_release_report(run)
    return run.run_dir


def resume_simulation(run_dir: Path, reports: bool = True) -> Path:
    """``fedsynth simulate --resume RUN_DIR``: the same run (its config.json) from its last complete checkpoint."""
    from server.resume import resumable_run

    run = resumable_run(Path(run_dir))
    names = json.loads((Path(run_dir) / "config.json").read_text()).get("class-names") or None
    return simulate(run, names, resume=True, reports=reports)


def write_release_report(run: RunConfig) -> None:
    """report.json + report.html in the run folder (``fedsynth evaluate``), its headline added to summary.txt."""
    from server.checkpoint import atomic_write_bytes

    from .report import evaluate, headline
    lines = headline(evaluate(run.run_dir, seed=run.seed))
    summary = run.run_dir / "summary.txt"
    text = summary.read_text() + "\nrelease report (report.html, report.json):\n" + "".join(f"  {x}\n" for x in lines)
    atomic_write_bytes(summary, text.encode())


def gpu_share(run: RunConfig) -> float:
    """Ray's GPU share per simulated site: 0 on the CPU; on a GPU, the sites that run at once (one per CPU core,
    as ``num_cpus`` = 1 allows) split it, so Ray neither hides the GPU from them nor queues them behind one."""
    if resolve_device(run.device) == "cpu":
        return 0.0
    return 1.0 / max(1, min(run.sites, os.cpu_count() or 1))


def partition_table_header(run: RunConfig) -> str:
    return (f"{run.sites} sites, partition {run.partition}, seed {run.seed}, "
            f"local holdout {run.holdout_fraction:.0%}; site folders under {run.state_dir}")


def _shutdown_ray() -> None:
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


def report_agreement(run: RunConfig, data: ImageDataset, names: list[str], seconds: float, n: int = 500) -> dict:
    """How often a classifier trained on real images gives a sample of class c the label c."""
    classifier = reference_classifier(data, Path(run.state_dir))
    model = build_generator(run.model, **run.model_kwargs())
    model.load_shared_weights(load_weights(run.run_dir / "weights.safetensors"))
    g = torch.Generator().manual_seed(run.seed + 1)
    per_class = {}
    for c, name in enumerate(names):
        samples = model.sample(n, torch.full((n,), c, dtype=torch.long), generator=g).numpy()
        per_class[name] = float((classifier.predict(samples) == c).mean())
    overall = float(np.mean(list(per_class.values())))
    result = {"classifier": "SmallCNN trained on the real training split", "samples-per-class": n,
              "agreement": overall, "per-class": per_class, "simulation-seconds": round(seconds, 1)}
    write_json(run.run_dir / "agreement.json", result)
    line = (f"\nclass agreement (a classifier trained on real images labels samples of class c as c): "
            f"{overall:.1%} [" + ", ".join(f"{k} {v:.1%}" for k, v in per_class.items()) + f"], n={n} per class\n"
            f"wall time of the simulation: {seconds:.0f}s\n")
    with open(run.run_dir / "summary.txt", "a") as f:
        f.write(line)
    return result


def classifier_key(data: ImageDataset) -> str:
    return hashlib.sha256(data.images.tobytes() + data.labels.tobytes()).hexdigest()[:16]


def reference_classifier(data: ImageDataset, cache_dir: Path) -> SmallCNN:
    """The shipped classifier for the bundled data set, else one trained once and cached per data file."""
    name = f"classifier-{classifier_key(data)}.safetensors"
    model = SmallCNN(len(data.classes), data.channels)
    for path in (Path(__file__).parent / "data" / name, Path(cache_dir) / name):
        if path.exists():
            model.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(path).items()})
            return model.eval()
    print("training the reference classifier on the real training split (once per data set)...")
    model = train_classifier(data.images, data.labels, len(data.classes))
    save_weights(Path(cache_dir) / name, {k: v.numpy() for k, v in model.state_dict().items()})
    return model
