"""Scale benchmark: 10 and 100 simulated sites on this machine, a fraction of them sampled per round.

    python -m simulations.bench_scale [--sites 10 100] [--fraction 0.1] [--rounds 3] [--secure/--no-secure]

Each site gets an iid share of the bundled PneumoniaMNIST and does tiny local work (2 DP steps per round);
every round still holds a roll call of *all* sites (each reports its spend and whether it can pay for the
next round), and SecAgg+ runs among the sampled ones. Reported per configuration: the time from the start
to round 1's checkpoint (Ray start, the sites' folders, and the first roll call, where every site calibrates
its σ once for the run), seconds per round after that (roll call of all sites + training round, from the
checkpoints' times), the training part alone (sampling, SecAgg+, aggregation), the wall time of the
simulation, and the peak resident memory of this process and everything it started (Ray and its workers),
sampled from /proc every 0.2 s. No release report is made (it does not depend on the site count).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from fedsynth.config import RunConfig


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * 4096  # field 24 of stat: resident pages
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the process tree's RSS in a background thread; ``peak`` in bytes."""

    def __init__(self, root: int, every: float = 0.2):
        self.root, self.every, self.peak = root, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.root))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench(sites: int, fraction: float, rounds: int, secure: bool, root: Path, seed: int = 0) -> dict:
    import os

    from simulations.runner import simulate

    run = RunConfig(run_id=f"scale-{sites}", sites=sites, rounds=rounds, fraction=fraction, secure=secure,
                    partition="iid", local_epochs=0.2, sample_rate=0.1, epsilon=10.0, seed=seed,
                    state_dir=str(root / f"state-{sites}"), out_dir=str(root / "runs"))
    t0 = time.time()
    with PeakMemory(os.getpid()) as mem:
        run_dir = simulate(run, reports=False)
    wall = time.time() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trained = [r for r in metrics["rounds"] if r["round"] >= 1 and "seconds" in r]
    if not trained:
        raise RuntimeError(f"{sites} sites: no round ran ({metrics['stop-reason']}); see {run_dir}/summary.txt")
    fit_s = sum(r["seconds"] for r in trained) / len(trained)
    # when each round's checkpoint was written: the gaps are whole rounds (roll call + training + checkpoint)
    done = [(run_dir / "checkpoints" / f"round-{r['round']:03d}.json").stat().st_mtime for r in trained]
    steady = (done[-1] - done[0]) / (len(done) - 1) if len(done) > 1 else float("nan")
    return {"sites": sites, "sampled": len(trained[0].get("sampled", [])), "rounds": len(trained),
            "completed": sum(1 for r in trained if r.get("sites")), "fit-s": fit_s, "round-s": steady,
            "first-s": done[0] - t0, "wall-s": wall, "peak-rss-gib": mem.peak / 2 ** 30}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--secure", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fs-scale-") as tmp:
        for n in args.sites:
            rows.append(bench(n, args.fraction, args.rounds, args.secure, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nSecAgg+ {'on' if args.secure else 'off'}, fraction {args.fraction}, {args.rounds} rounds, "
          "2 DP steps per sampled site per round")
    print("| sites | sampled/round | rounds done | start to round 1 done, s | s/round after round 1 | "
          "of which training, s | wall s | peak RSS (GiB) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sites']} | {r['sampled']} | {r['completed']}/{r['rounds']} | {r['first-s']:.0f} | "
              f"{r['round-s']:.1f} | {r['fit-s']:.1f} | {r['wall-s']:.0f} | {r['peak-rss-gib']:.2f} |")


if __name__ == "__main__":
    main()
