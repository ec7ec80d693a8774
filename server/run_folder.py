"""Everything a run leaves behind, in one folder (layout documented in README.md)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedsynth.config import RunConfig  # noqa: E402
from models import Generator  # noqa: E402

from .checkpoint import atomic_write_bytes, save_weights, write_json  # noqa: E402
from .robustness_summary import charged_not_used, robustness_lines  # noqa: E402
from .ledger_heads import write_ledger_heads  # noqa: E402

PRIVACY_KEYS = ("epsilon", "delta", "epsilon-budget", "unit", "accountant", "sigma", "clip", "sample-rate",
                "steps", "rounds", "rounds-this-run", "class-mean-releases")


def write_run_folder(run_dir: Path, run: RunConfig, strategy, weights, seconds: float,
                     stop_reason: str | None, class_names: list[str] | None = None) -> None:
    run_dir = Path(run_dir)
    model: Generator = strategy.model
    model.load_shared_weights(weights)
    save_weights(run_dir / "weights.safetensors", weights, {"family": run.model, "run_id": run.run_id})
    write_json(run_dir / "config.json", {**run.to_flower(), "class-names": class_names or []})
    rounds = [strategy.round_metrics[r] for r in sorted(strategy.round_metrics)]
    write_json(run_dir / "metrics.json", {"rounds": rounds, "refusals": strategy.refusals,
                                          "seconds": round(seconds, 2), "stop-reason": stop_reason,
                                          "charged-not-used": charged_not_used(strategy)})
    privacy = {site: {k: (None if m[k] == "" else m[k]) for k in PRIVACY_KEYS if k in m}  # "": never planned
               for site, m in sorted(strategy.sites.items())}
    write_json(run_dir / "privacy.json", privacy)
    write_ledger_heads(run_dir, run.run_id, rounds)  # the sites' ledger heads per round (fedsynth audit --anchors)
    names = class_names or [f"class {c}" for c in range(run.num_classes)]
    save_png(run_dir / "samples.png", sample_grid(model, names, per_class=10, seed=run.seed))
    save_png(run_dir / "epsilon.png", epsilon_plot(rounds, privacy))
    completed = sum(1 for r in rounds if r.get("sites") and r["round"] >= 1)  # round 0: the class-mean release
    lines = [
        f"fedsynth run {run.run_id}: {run.model}, {run.sites} sites, {completed}/{run.rounds} rounds "
        f"in {seconds:.0f}s, secure aggregation {'on (SecAgg+)' if run.secure else 'off'}",
        f"stopped early: {stop_reason}" if stop_reason else "all rounds completed",
        "", "privacy per site (composed over every round and run in its ledger):",
        f"  {'site':<10} {'ε':>7} {'budget':>7} {'δ':>8} {'σ':>7} {'C':>5} {'q':>6} {'steps':>6} {'rounds':>6}  unit",
    ]
    for site, p in privacy.items():
        lines.append(f"  {site:<10} {p['epsilon']:>7.3f} {p['epsilon-budget']:>7.3g} {p['delta']:>8.1e} "
                     f"{'-' if p['sigma'] is None else format(p['sigma'], '.3f'):>7} {p['clip']:>5.2g} {p['sample-rate']:>6.3g} {p['steps']:>6} "
                     f"{p['rounds']:>6}  {p['unit']} ({p['accountant']})")
    for r in strategy.refusals:
        lines.append(f"  refused: {r['site']} round {r['round']}: {r['reason']}")
    lines += class_mean_lines(run, strategy.round_metrics.get(0, {}))
    lines += robustness_lines(strategy, rounds)
    lines += ["", "files: weights.safetensors config.json metrics.json privacy.json samples.png epsilon.png "
              "checkpoints/"]
    atomic_write_bytes(run_dir / "summary.txt", ("\n".join(lines) + "\n").encode())


def class_mean_lines(run: RunConfig, round0: dict[str, Any]) -> list[str]:
    if run.class_mean_share <= 0:
        return ["", "class means: not released (class-mean-share 0); every class starts from the plain model"]
    if round0.get("phase") != "class-means":
        return []  # the run ended before round 0
    if round0.get("skipped"):
        return ["", f"class means: {round0['skipped']}"]
    return ["", f"class means: released once before round 1 by {', '.join(round0['sites'])} (share "
                f"{run.class_mean_share:g} of each site's ε; one Gaussian mechanism, σ in each ledger's round-0 "
                f"charge); the model's class prior starts from them (noisy counts per class: {round0['class-counts']})"]


def sample_grid(model: Generator, class_names: list[str], per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(len(class_names), 1, figsize=(per_class * 0.9, 1.1 * len(class_names) + 0.3))
    for c, ax in enumerate(np.atleast_1d(axes)):
        imgs = model.sample(per_class, torch.full((per_class,), c, dtype=torch.long), generator=g).numpy()
        tiles = np.pad(imgs.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 1), (0, 0)), constant_values=1.0)
        row = np.concatenate(list(tiles), axis=1)[:, :-1]  # 1-pixel white gaps between samples
        ax.imshow(row.squeeze(-1) if row.shape[-1] == 1 else row, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(class_names[c], rotation=0, ha="right", va="center")
    fig.suptitle("synthetic samples per class")
    return fig


def epsilon_plot(rounds: list[dict[str, Any]], privacy: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for site in privacy:
        xs = [r["round"] for r in rounds if site in r.get("epsilon", {})]
        ax.plot(xs, [r["epsilon"][site] for r in rounds if site in r.get("epsilon", {})], marker="o", label=site)
    budgets = {p["epsilon-budget"] for p in privacy.values()}
    for b in budgets:
        ax.axhline(b, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("round (0 = before training)"), ax.set_ylabel("ε spent (composed)")
    ax.legend(fontsize=7), ax.set_title("privacy spent per site")
    fig.tight_layout()
    return fig


def save_png(path: Path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
