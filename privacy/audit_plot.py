"""``fedsynth audit --plot FILE.png``: ε spent over time per site (PRV solid, dp-accounting RDP dashed),
with each site's planned budgets as horizontal lines and refusals as crosses."""
from __future__ import annotations

import io
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any


def plot_audit(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: expected a .png file name")
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for k, site in enumerate(report["sites"]):
        color = f"C{k % 10}"
        rows = [r for r in site["charges"] if isinstance(r.get("time"), (int, float))]
        if rows:
            # Start from ε = 0 at the ledger's first entry, so a single charge still shows as a step.
            times = [e["time"] for e in site["timeline"] if isinstance(e.get("time"), (int, float))]
            when = [datetime.fromtimestamp(t) for t in [min(times), *(r["time"] for r in rows)]]
            ax.step(when, [0.0] + [r["epsilon_recomputed"] for r in rows], where="post", color=color, marker="o",
                    ms=3, label=f"{site['site']} (PRV)" + ("" if site["ok"] else " — FAILED"))
            ax.step(when, [0.0] + [r["epsilon_rdp"] for r in rows], where="post", color=color, ls="--", lw=0.8,
                    label=f"{site['site']} (RDP)")
            drawn = True
        for budget in sorted({p["epsilon_budget"] for p in site["plans"] if p.get("epsilon_budget")}):
            ax.axhline(budget, color=color, ls=":", lw=0.8)
        refused = [e for e in site["timeline"] if e["kind"] == "refusal" and isinstance(e.get("time"), (int, float))]
        if refused:
            eps_at = [_eps_before(rows, e["time"]) for e in refused]
            ax.plot([datetime.fromtimestamp(e["time"]) for e in refused], eps_at, "x", color=color, ms=7,
                    label=f"{site['site']} refused" if not rows else None)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no charges in these ledgers", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time")
    ax.set_ylabel("ε spent (composed over the ledger)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"privacy spent per site — audit {'OK' if report['ok'] else 'FAILED'}\n"
                 "solid: PRV, dashed: RDP (dp-accounting), dotted: planned budgets, ×: refused rounds", fontsize=9)
    if drawn:
        ax.legend(fontsize=7)
    locator = matplotlib.dates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(matplotlib.dates.ConciseDateFormatter(locator))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _eps_before(rows: list[dict[str, Any]], t: float) -> float:
    before = [r["epsilon_recomputed"] for r in rows if r["time"] <= t]
    return before[-1] if before else 0.0
