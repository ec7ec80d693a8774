"""The ``fedsynth`` command: simulate, generate, evaluate, audit. ``fedsynth COMMAND --help`` explains every flag."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import RunConfig

D = RunConfig()


def _partition(spec: str) -> str:
    from simulations.partition import parse_partition
    try:
        parse_partition(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsynth", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="run N simulated hospitals on this machine (Flower Simulation Engine)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from models import FAMILIES
    s.add_argument("--model", default=D.model, choices=sorted(FAMILIES),
                   help="generator family (gan: only the discriminator is private; diffusion: K noise draws "
                        "per image count as one unit)")
    s.add_argument("--sites", type=int, default=D.sites, help="number of simulated hospitals")
    s.add_argument("--rounds", type=int, default=D.rounds, help="federated rounds")
    s.add_argument("--epsilon", type=float, default=D.epsilon,
                   help="each site's total privacy budget ε (composed over every round and run in its ledger)")
    s.add_argument("--delta", type=float, default=D.delta, help="δ; must be below 1/N for every site")
    s.add_argument("--clip", type=float, default=D.clip, help="per-image gradient clipping norm C")
    s.add_argument("--sample-rate", type=float, default=D.sample_rate, help="Poisson sampling rate q per DP step")
    s.add_argument("--local-epochs", type=float, default=D.local_epochs,
                   help="local epochs per round (DP steps per round = ceil(epochs / q))")
    s.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help="Adam learning rate, cosine-decayed over the run (default: the family's: " +
                        ", ".join(f"{k} {c.default_lr[0]:g}→{c.default_lr[1]:g}" for k, c in sorted(FAMILIES.items())) + ")")
    s.add_argument("--n-critic", type=int, default=D.n_critic,
                   help="gan: discriminator (DP) steps per generator step")
    s.add_argument("--noise-multiplicity", type=int, default=D.noise_multiplicity,
                   help="diffusion: noise draws per image per DP step (together one privacy unit)")
    s.add_argument("--sampler-steps", type=int, default=D.sampler_steps, help="diffusion: DDIM sampling steps")
    s.add_argument("--partition", type=_partition, default=D.partition,
                   help="how the data is split: iid | dirichlet:ALPHA (label skew) | quantity:ALPHA (size skew)")
    s.add_argument("--secure", action=argparse.BooleanOptionalAction, default=D.secure,
                   help="secure aggregation (Flower SecAgg+): the server only sees the sum of the updates")
    s.add_argument("--data", default="", help="data: a MedMNIST-style .npz or a folder with one subfolder per "
                   "class (default: the bundled PneumoniaMNIST)")
    s.add_argument("--state-dir", default=D.state_dir,
                   help="the simulated hospitals' folders (data and privacy ledger per site); reuse it to keep "
                        "composing each site's ε across runs")
    s.add_argument("--out", default=D.out_dir, help="folder for run folders")
    s.add_argument("--run-id", default="", help="run folder name (default: a timestamp)")
    s.add_argument("--seed", type=int, default=D.seed, help="seed for partitions, models and noise")

    g = sub.add_parser("generate", help="sample synthetic images from a finished run")
    g.add_argument("run_dir", help="a run folder (holds weights.safetensors and config.json)")
    g.add_argument("--n", type=int, required=True, help="number of images")
    g.add_argument("--label", type=int, default=None, help="class id for every image (default: uniform)")
    g.add_argument("--out", required=True, help="FILE.npz (MedMNIST-style arrays) or a DIR of PNGs per class")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")

    e = sub.add_parser("evaluate", help="release report of a finished run: fidelity, utility, memorization, "
                       "membership inference and privacy → report.json + report.html")
    e.add_argument("run_dir", help="a run folder (weights.safetensors, config.json, privacy.json, metrics.json)")
    e.add_argument("--data", default=None, help="the real data (.npz with a test or val split; default: the "
                   "run's data-path)")
    e.add_argument("--n", type=int, default=None, help="synthetic images to evaluate (default: the real training "
                   "split's size, at most 2000); also the black-box attack's sample count")
    e.add_argument("--out", default=None, help="folder for report.json and report.html (default: RUN_DIR)")
    e.add_argument("--seed", type=int, default=None, help="seed for sampling, subsets and bootstraps "
                   "(default: the run's seed)")

    a = sub.add_parser("audit", help="verify site ledgers (hash chain, signatures) and recompute their ε; "
                       "exits 1 if any check fails")
    a.add_argument("path", help="a ledger file (ledger.jsonl) or a state folder holding site-*/ledger.jsonl")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--plot", metavar="FILE.png", default=None, help="also draw ε (PRV and RDP) over time per site")
    a.add_argument("--expect-key", action="append", default=[], metavar="FINGERPRINT",
                   help="pin the sites' public keys: sha256 fingerprint (hex, or its first ≥16 digits) that each "
                        "ledger's key must match; repeat for several sites")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    fed = logging.getLogger("fedsynth")
    fed.setLevel(logging.INFO)
    fed.addHandler(handler)
    fed.propagate = False  # Flower prints its own log lines; don't echo them twice
    logging.getLogger("flwr").setLevel(logging.INFO)  # SecAgg+ stage chatter is DEBUG
    try:
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_audit(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedsynth {args.command}: error: {exc}", file=sys.stderr)
        return 2


def cmd_simulate(args) -> int:
    from simulations.runner import simulate
    run = RunConfig(run_id=args.run_id or time.strftime("run-%Y%m%d-%H%M%S"), model=args.model, rounds=args.rounds,
                    sites=args.sites, epsilon=args.epsilon, delta=args.delta, clip=args.clip,
                    sample_rate=args.sample_rate, local_epochs=args.local_epochs, **_lr(args),
                    n_critic=args.n_critic, noise_multiplicity=args.noise_multiplicity,
                    sampler_steps=args.sampler_steps,
                    partition=args.partition, secure=args.secure, data_path=args.data, state_dir=args.state_dir,
                    out_dir=args.out, seed=args.seed)
    names = ["normal", "pneumonia"] if not args.data else None
    run_dir = simulate(run, names)
    print((run_dir / "summary.txt").read_text())
    print(f"results: {run_dir}")
    return 0


def _lr(args) -> dict[str, float]:
    from models import FAMILIES
    lr, lr_final = FAMILIES[args.model].default_lr
    if getattr(args, "lr", None) is None:  # not given: the family's own schedule
        return dict(lr=lr, lr_final=lr_final)
    return dict(lr=args.lr, lr_final=min(lr_final, args.lr))


def cmd_generate(args) -> int:
    from simulations.generate import generate
    out = generate(Path(args.run_dir), args.n, args.label, Path(args.out), args.seed)
    print(f"wrote {args.n} images to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from simulations.report import evaluate, headline
    out = Path(args.out or args.run_dir)
    report = evaluate(Path(args.run_dir), args.data, args.n, out, args.seed)
    print("\n".join(headline(report)))
    print(f"wrote {out / 'report.json'} and {out / 'report.html'}")
    return 0


def cmd_audit(args) -> int:
    from privacy.audit import audit, format_audit
    report = audit(Path(args.path), args.expect_key)
    print(json.dumps(report, indent=2) if args.json else format_audit(report), end="" if not args.json else "\n")
    if args.plot:
        from privacy.audit_plot import plot_audit
        plot_audit(report, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
