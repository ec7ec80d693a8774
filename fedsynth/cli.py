"""The ``fedsynth`` command: simulate, generate, evaluate, audit, certs, server, client (``COMMAND --help``)."""
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
    s.add_argument("--class-mean-share", type=float, default=D.class_mean_share, metavar="SHARE",
                   help="share of each site's ε spent once, before round 1, on its per-class mean images (the "
                        "families' class prior); 0 = off")
    s.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help="Adam learning rate, cosine-decayed over the run (default: the family's: " +
                        ", ".join(f"{k} {c.default_lr[0]:g}→{c.default_lr[1]:g}" for k, c in sorted(FAMILIES.items())) + ")")
    s.add_argument("--n-critic", type=int, default=D.n_critic,
                   help="gan: discriminator (DP) steps per generator step")
    s.add_argument("--device", default=D.device,
                   help="where the sites train: auto (a GPU when torch sees one) | cpu | cuda | cuda:N; a "
                        "hospital's node config key device overrides it")
    s.add_argument("--diversity", type=float, default=D.diversity,
                   help="gan: weight of the mode-seeking term in the generator step (no real image, no ε); 0 = off")
    s.add_argument("--noise-multiplicity", type=int, default=D.noise_multiplicity,
                   help="diffusion: noise draws per image per DP step (together one privacy unit)")
    s.add_argument("--sampler-steps", type=int, default=D.sampler_steps, help="diffusion: DDIM sampling steps")
    s.add_argument("--coarse", type=int, default=D.coarse,
                   help="every family: the generator works at resolution/coarse and its samples are upsampled "
                        "(fewer noisy parameters under DP); 1 = full resolution")
    s.add_argument("--partition", type=_partition, default=D.partition,
                   help="how the data is split: iid | dirichlet:ALPHA (label skew) | quantity:ALPHA (size skew)")
    s.add_argument("--secure", action=argparse.BooleanOptionalAction, default=D.secure,
                   help="secure aggregation (Flower SecAgg+): the server only sees the sum of the updates")
    s.add_argument("--secagg-deltas", action=argparse.BooleanOptionalAction, default=D.secagg_deltas,
                   help="SecAgg+ masks each site's update minus the global model (within ±2, 16-bit: half the bytes "
                        "on the wire, aggregate error ≈4e-4) instead of the weights")
    s.add_argument("--data", default="", help="data: a MedMNIST-style .npz or a folder with one subfolder per "
                   "class (default: the bundled PneumoniaMNIST)")
    s.add_argument("--state-dir", default=D.state_dir,
                   help="the simulated hospitals' folders (data and privacy ledger per site); reuse it to keep "
                        "composing each site's ε across runs")
    s.add_argument("--out", default=D.out_dir, help="folder for run folders")
    s.add_argument("--run-id", default="", help="run folder name (default: a timestamp)")
    s.add_argument("--seed", type=int, default=D.seed, help="seed for partitions, models and noise")
    s.add_argument("--audit-canaries", type=int, default=D.audit_canaries, metavar="M",
                   help="plant M out-of-distribution canaries at site-0 (each trained on with probability ½) and "
                        "report an empirical lower bound on its ε (one-run audit, Steinke et al. 2023); exits 3 "
                        "if the bound exceeds the accounted ε; 0 = off")
    s.add_argument("--fraction", type=float, default=D.fraction,
                   help="share of the willing sites sampled per round (by site name, seeded by seed and round)")
    s.add_argument("--dropout", type=float, default=D.dropout, metavar="P",
                   help="simulate faults: each site drops out of each round with probability P, before training "
                        "(nothing sent, nothing charged); drawn from the seed, round and site")
    s.add_argument("--straggler", type=float, default=D.straggler, metavar="P",
                   help="simulate faults: each site trains but answers only after --round-timeout with "
                        "probability P (its update left: charged, not used)")
    s.add_argument("--round-timeout", type=float, default=D.round_timeout, metavar="SECONDS",
                   help="how long the server waits for a round's updates; later ones are left out")
    s.add_argument("--max-update-norm", type=float, default=D.max_update_norm,
                   help="the server rejects an update whose L2 distance to the global model exceeds this "
                        "(under SecAgg+: the aggregate's)")
    s.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a killed run from its last complete checkpoint, with its own config.json "
                        "(the other flags are ignored); no round is charged twice at any site")
    s.add_argument("--no-report", action="store_true",
                   help="skip the class agreement and the release report at the end (run `fedsynth evaluate "
                        "RUN_DIR` later)")

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
    a.add_argument("--anchors", action="append", default=[], metavar="RUN_DIR",
                   help="also check that every ledger head the server recorded in RUN_DIR/ledger-heads.json (or "
                        "that file) is still in the chain: catches a ledger rewritten and re-signed with the "
                        "site's own key; repeat for several runs")
    _add_deployment_parsers(sub, s)
    return p


# Run-config flags `fedsynth server` shares with `simulate` (same actions, so help and defaults stay in step).
SERVER_RUN_FLAGS = ("model", "rounds", "epsilon", "delta", "clip", "sample_rate", "local_epochs", "class_mean_share",
                    "lr", "n_critic", "diversity", "device",
                    "noise_multiplicity", "sampler_steps", "coarse", "secure", "secagg_deltas", "fraction", "round_timeout", "max_update_norm",
                    "out", "run_id", "seed")


def _add_deployment_parsers(sub, simulate: argparse.ArgumentParser) -> None:
    """``certs``, ``server`` and ``client``: a real deployment (see README, *For hospital IT*)."""
    c = sub.add_parser("certs", help="create the CA, the SuperLink's TLS certificate and one SuperNode key per "
                       "hospital (ECDSA P-384)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("dir", help="folder for ca.crt/ca.key, superlink/server.{crt,key}, hospitals/NAME/node.{key,pub}; "
                   "an existing CA there is reused")
    c.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="a DNS name the hospitals use to reach the SuperLink (subject alternative name; repeatable)")
    c.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                   help="an IP address the hospitals use to reach the SuperLink (repeatable)")
    c.add_argument("--hospital", action="append", default=[], metavar="NAME",
                   help="make a SuperNode authentication key pair for this hospital (repeatable)")
    c.add_argument("--days", type=int, default=825, help="validity of the SuperLink certificate")
    c.add_argument("--force", action="store_true", help="replace keys that already exist")

    srv = sub.add_parser("server", help="coordinator: start a SuperLink (TLS, SuperNode authentication), register "
                         "the hospitals and run the federation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    srv.add_argument("--certs", required=True, help="the folder `fedsynth certs` wrote")
    srv.add_argument("--register", action="append", default=[], metavar="NODE.pub",
                     help="a hospital's public key to admit (repeatable; default: every CERTS/hospitals/*/node.pub)")
    srv.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on")
    srv.add_argument("--port", type=int, default=9092, help="the SuperLink's one HTTPS port (open it to the hospitals)")
    srv.add_argument("--sites", type=int, default=None,
                     help="hospitals to wait for before round 1 (default: every registered key)")
    for action in simulate._actions:  # argparse's own `parents=` shares action objects the same way
        if action.dest in SERVER_RUN_FLAGS:
            srv._add_action(action)
    srv.add_argument("--flwr-home", default=None, help="private Flower folder (SuperLink connection, installed app, "
                     "logs; default: OUT/.flwr) — your ~/.flwr is not touched")
    srv.add_argument("--keep-superlink", action="store_true", help="leave the SuperLink running after the run")
    srv.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue that run (its config.json) from its last complete checkpoint after the server "
                          "was stopped or killed; run settings come from the folder, not from flags")

    cl = sub.add_parser("client", help="hospital: check the data and policy locally (dry run), then start a "
                        "SuperNode (TLS, node key)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cl.add_argument("--data", required=True, help="the site's images: a MedMNIST-style .npz or a folder with one "
                    "subfolder per class")
    cl.add_argument("--site-name", default="", help="the site's name in reports (default: the data file's name)")
    cl.add_argument("--ledger", default=None, help="the privacy ledger (default: ledger.jsonl beside the data)")
    cl.add_argument("--ledger-key", default=None, help="the ledger's signing key (default: site.key beside the ledger)")
    cl.add_argument("--policy-file", default=None, help="JSON file with the site's rules (keys as below)")
    cl.add_argument("--max-epsilon", type=float, default=None, help="policy: total ε this site ever spends")
    cl.add_argument("--max-delta", type=float, default=None, help="policy: largest δ")
    cl.add_argument("--min-sigma", type=float, default=None, help="policy: smallest noise multiplier σ")
    cl.add_argument("--max-clip", type=float, default=None, help="policy: largest clipping norm C")
    cl.add_argument("--max-rounds", type=int, default=None, help="policy: most rounds per run")
    cl.add_argument("--allowed-models", default=None, help="policy: comma-separated model families")
    cl.add_argument("--device", default=None, help="where this hospital trains: auto | cpu | cuda | cuda:N "
                                                    "(default: the run's, auto); a GPU it lacks is refused")
    cl.add_argument("--resolution", type=int, default=D.resolution, help="image size the dry run resizes to")
    cl.add_argument("--dry-run", action="store_true", help="only check and print; contact no one")
    cl.add_argument("--superlink", default=None, metavar="HOST:PORT", help="the coordinator's SuperLink")
    cl.add_argument("--ca", default=None, help="the coordinator's CA certificate (ca.crt)")
    cl.add_argument("--node-key", default=None, help="this hospital's node.key (from `fedsynth certs`)")
    cl.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's own API (one per node on "
                    "a machine; listens on 127.0.0.1 only)")
    cl.add_argument("--flwr-home", default=None, help="private Flower folder (node config, installed app; default: "
                    ".flwr beside the ledger)")
    cl.add_argument("--max-wait-time", type=float, default=None,
                    help="give up when the SuperLink can't be reached for this many seconds (default: keep trying)")


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
        if args.command in DEPLOYMENT_COMMANDS:
            return DEPLOYMENT_COMMANDS[args.command](args)
        return cmd_audit(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedsynth {args.command}: error: {exc}", file=sys.stderr)
        return 2


def cmd_simulate(args) -> int:
    from simulations.runner import resume_simulation, simulate
    if args.resume:
        run_dir = resume_simulation(Path(args.resume), reports=not args.no_report)
        print((run_dir / "summary.txt").read_text())
        print(f"results: {run_dir}")
        return _canary_verdict(run_dir)
    run = RunConfig(run_id=args.run_id or time.strftime("run-%Y%m%d-%H%M%S"), model=args.model, rounds=args.rounds,
                    sites=args.sites, epsilon=args.epsilon, delta=args.delta, clip=args.clip,
                    sample_rate=args.sample_rate, local_epochs=args.local_epochs, **_lr(args),
                    class_mean_share=args.class_mean_share, n_critic=args.n_critic, diversity=args.diversity, device=args.device,
                    noise_multiplicity=args.noise_multiplicity, coarse=args.coarse, sampler_steps=args.sampler_steps,
                    partition=args.partition, secure=args.secure, secagg_deltas=args.secagg_deltas,
                    data_path=args.data, state_dir=args.state_dir,
                    out_dir=args.out, seed=args.seed, audit_canaries=args.audit_canaries,
                    fraction=args.fraction, dropout=args.dropout, straggler=args.straggler,
                    round_timeout=args.round_timeout, max_update_norm=args.max_update_norm)
    names = ["normal", "pneumonia"] if not args.data else None
    run_dir = simulate(run, names, reports=not args.no_report)
    print((run_dir / "summary.txt").read_text())
    print(f"results: {run_dir}")
    return _canary_verdict(run_dir)


def _canary_verdict(run_dir: Path) -> int:
    """3 with a WARNING line when the canary audit's lower bound exceeds the accounted ε, else 0."""
    from simulations.canaries import REPORT, warning
    if not (run_dir / REPORT).is_file():
        return 0
    result = json.loads((run_dir / REPORT).read_text())
    if result["exceeds-accounted"]:
        print(warning(result), file=sys.stderr)
        return 3
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
    from privacy.anchors import load_anchors
    anchors = [a for run in args.anchors for a in load_anchors(Path(run))] if args.anchors else None
    report = audit(Path(args.path), args.expect_key, anchors)
    print(json.dumps(report, indent=2) if args.json else format_audit(report), end="" if not args.json else "\n")
    if args.plot:
        from privacy.audit_plot import plot_audit
        plot_audit(report, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())


def cmd_certs(args) -> int:
    from .certs import make_certs
    for path in make_certs(Path(args.dir), args.dns, args.ip, args.hospital, args.days, args.force):
        print(f"wrote {path}")
    return 0


def cmd_server(args) -> int:
    from .coordinator import Deployment, check_deployment
    dep = Deployment(certs=Path(args.certs), host=args.host, port=args.port,
                     public_keys=[Path(k) for k in args.register],
                     flwr_home=Path(args.flwr_home) if args.flwr_home else None, keep_superlink=args.keep_superlink)
    _, hospitals = check_deployment(dep)
    if args.resume:
        from server.resume import CheckpointError, resumable_run
        try:
            run = resumable_run(Path(args.resume))
        except CheckpointError as exc:
            print(f"fedsynth server: error: {exc}", file=sys.stderr)
            return 2
        return _serve(run, dep, resume=True)
    run = RunConfig(run_id=args.run_id or time.strftime("run-%Y%m%d-%H%M%S"), model=args.model, rounds=args.rounds,
                    sites=args.sites or len(hospitals), epsilon=args.epsilon, delta=args.delta, clip=args.clip,
                    sample_rate=args.sample_rate, local_epochs=args.local_epochs, **_lr(args),
                    class_mean_share=args.class_mean_share, n_critic=args.n_critic, diversity=args.diversity, device=args.device,
                    noise_multiplicity=args.noise_multiplicity, coarse=args.coarse, sampler_steps=args.sampler_steps, secure=args.secure, secagg_deltas=args.secagg_deltas,
                    fraction=args.fraction, round_timeout=args.round_timeout, max_update_norm=args.max_update_norm,
                    out_dir=args.out, seed=args.seed)
    return _serve(run, dep)


def _serve(run: RunConfig, dep, resume: bool = False) -> int:
    from .coordinator import serve
    try:
        run_dir = serve(run, dep, resume=resume)
    except RuntimeError as exc:
        print(f"fedsynth server: error: {exc}", file=sys.stderr)
        return 1
    print((run_dir / "summary.txt").read_text())
    print(f"results: {run_dir}")
    return 0


def cmd_client(args) -> int:
    from .hospital import Hospital, check_credentials, dry_run, run_supernode, start
    policy = {"max-epsilon": args.max_epsilon, "max-delta": args.max_delta, "min-sigma": args.min_sigma,
              "max-clip": args.max_clip, "max-rounds": args.max_rounds, "allowed-models": args.allowed_models}
    hospital = Hospital(data=Path(args.data), site_name=args.site_name,
                        ledger=Path(args.ledger) if args.ledger else None,
                        ledger_key=Path(args.ledger_key) if args.ledger_key else None,
                        policy=policy, policy_file=Path(args.policy_file) if args.policy_file else None,
                        device=args.device)
    if not args.dry_run:  # check what the SuperNode needs before the (slower) data check
        missing = [f for f, v in (("--superlink", args.superlink), ("--ca", args.ca), ("--node-key", args.node_key))
                   if not v]
        if missing:
            raise ValueError(f"to start a SuperNode, give {', '.join(missing)} (or --dry-run to only check)")
        check_credentials(Path(args.ca), Path(args.node_key))
    print(dry_run(hospital, args.resolution), flush=True)
    if args.dry_run:
        return 0
    proc = start(hospital, args.superlink, Path(args.ca), Path(args.node_key),
                 Path(args.flwr_home) if args.flwr_home else None, port=args.port, max_wait=args.max_wait_time)
    return run_supernode(proc)


DEPLOYMENT_COMMANDS = {"certs": cmd_certs, "server": cmd_server, "client": cmd_client}
