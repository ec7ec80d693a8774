"""Diagnostic: TSTR over the rounds of one simulated run, judged on the sites' local holdouts (never on test).

``python -m simulations.tstr_over_rounds RUN_DIR [--rounds 0 1 5 10 20] [--n 2000]`` loads each round's
checkpoint (``checkpoints/round-NNN.safetensors``; round 0: the class-mean prior before any DP-SGD), samples
n balanced images and prints the report's TSTR AUC (one classifier seed, to be quick) on the pooled local
holdouts of the run's simulated sites, the shipped classifier's class agreement, and the per-class sample
spread — to see in which rounds a run gains or loses its class signal. The holdouts are site data: this is a
simulation tool, not something a deployment can run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from server.checkpoint import load_weights

from . import metrics as M
from .report import load_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rounds", type=int, nargs="+", default=None, help="default: every checkpoint")
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    inp = load_inputs(args.run_dir, None)
    if inp.nonmembers is None:
        raise SystemExit(f"{args.run_dir}: {inp.sites_note}")
    rounds = args.rounds if args.rounds is not None else sorted(
        int(f.stem.split("-")[1]) for f in (args.run_dir / "checkpoints").glob("round-*.safetensors"))
    labels = M.balanced_labels(args.n, inp.run.num_classes, inp.run.seed)
    y, hold = labels.numpy(), inp.nonmembers
    for r in rounds:
        path = args.run_dir / "checkpoints" / f"round-{r:03d}.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (the run's checkpoints: {args.run_dir / 'checkpoints'})")
        inp.model.load_shared_weights(load_weights(path))
        inp.model.eval()
        syn = M.sample_images(inp.model, labels, inp.run.seed)
        tstr = M.train_and_test(syn, y, hold.images, hold.labels, inp.run.num_classes, inp.run.seed,
                                n_boot=20, n_seeds=1)["auc"]["value"]
        pred = inp.classifier.predict(syn)
        agree = " / ".join(f"{(pred[y == c] == c).mean():.0%}" for c in range(inp.run.num_classes))
        spread = " / ".join(f"{syn[y == c].std(0).mean():.3f}" for c in range(inp.run.num_classes))
        print(f"round {r}: holdout TSTR AUC {tstr:.3f} (1 classifier seed), agreement {agree}, "
              f"per-class pixel sd {spread}", flush=True)


if __name__ == "__main__":
    main()
