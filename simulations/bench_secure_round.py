"""Benchmark: what SecAgg+ costs a real private training round (issue 8: target ≤ 1.1× the plain round).

    python -m simulations.bench_secure_round [--families vae gan diffusion] [--rounds 4] [--sites 3]

For each family, real ``fedsynth simulate`` runs (3 sites, the family's default DP-SGD round: 40 steps at
q = 0.3, the class-mean release off so every round trains) with SecAgg+ and without, in the order plain,
secure, secure, plain (so a drift in the machine's load hits both modes alike). Per run: the median of its
rounds' seconds after round 1 (``metrics.json``: the fit workflow, training included, as the server timed
it); per mode the mean of its two runs; the ratio secure / plain. No release report (``--no-report``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORDER = ("plain", "secure", "secure", "plain")


def round_seconds(family: str, secure: bool, rounds: int, sites: int, root: Path, k: int) -> float:
    run_id = f"{family}-{'secure' if secure else 'plain'}-{k}"
    cmd = [sys.executable, "-m", "fedsynth.cli", "simulate", "--model", family, "--rounds", str(rounds),
           "--sites", str(sites), "--class-mean-share", "0", "--secure" if secure else "--no-secure",
           "--state-dir", str(root / run_id / "state"), "--out", str(root / "runs"), "--run-id", run_id,
           "--no-report"]
    with open(root / f"{run_id}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    metrics = json.loads((root / "runs" / run_id / "metrics.json").read_text())
    return statistics.median(r["seconds"] for r in metrics["rounds"] if r["round"] >= 2 and r.get("sites"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["vae", "gan", "diffusion"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--sites", type=int, default=3)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsynth-secround-") as tmp:
        for family in args.families:
            times = {"plain": [], "secure": []}
            for k, mode in enumerate(ORDER):
                t0 = time.time()
                times[mode].append(round_seconds(family, mode == "secure", args.rounds, args.sites, Path(tmp), k))
                print(f"[{time.strftime('%H:%M:%S')}] {family} {mode}: {times[mode][-1]:.2f} s per round "
                      f"(run took {time.time() - t0:.0f} s)", flush=True)
            plain, secure = statistics.mean(times["plain"]), statistics.mean(times["secure"])
            rows.append((family, plain, secure, secure / plain))
    print(f"\n{args.sites} sites, default DP-SGD round (40 steps at q = 0.3), median s/round after round 1, "
          "mean of 2 runs per mode")
    print("| family | plain s/round | SecAgg+ s/round | SecAgg+ / plain (target ≤ 1.1×) |\n|---|---|---|---|")
    for family, plain, secure, ratio in rows:
        print(f"| {family} | {plain:.2f} | {secure:.2f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
