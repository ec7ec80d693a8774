"""The release report's pictures and its self-contained HTML page (every image embedded as a base64 PNG)."""
from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


# --- pictures ---------------------------------------------------------------------------------------------
def tile(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → one (rows·H, cols·W[, 3]) image with 1-pixel white gaps; empty cells white."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // cols))
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, k * (w + 1): k * (w + 1) + w] = img.transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def _show(ax, grid: np.ndarray, title: str = "") -> None:
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def class_grids(syn, y, names, per_class: int = 32, cols: int = 8):
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 1.9 + 0.35 * per_class / cols),
                             squeeze=False)
    for c, ax in enumerate(axes[0]):
        _show(ax, tile(syn[y == c][:per_class], cols), f"synthetic: {names[c]}")
    return fig


def real_vs_synthetic(real, ry, syn, sy, names, k: int = 8):
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 1.3 * len(names) + 0.5), squeeze=False)
    for c, name in enumerate(names):
        _show(axes[c, 0], tile(real[ry == c][:k], k), f"real (held-out): {name}")
        _show(axes[c, 1], tile(syn[sy == c][:k], k), f"synthetic: {name}")
    fig.tight_layout()
    return fig


def over_rounds(rounds: list[dict], privacy: dict, agreement: dict[str, float]):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for site in privacy:
        pts = [(r["round"], r["epsilon"][site]) for r in rounds if site in r.get("epsilon", {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"ε {site}")
    for budget in {p.get("epsilon-budget") for p in privacy.values()} - {None}:
        ax.axhline(budget, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("round"), ax.set_ylabel("ε spent (composed)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if agreement:
        ax2 = ax.twinx()
        xs = sorted(agreement, key=int)
        ax2.plot([int(x) for x in xs], [agreement[x] for x in xs], c="k", marker="s", ms=3, label="agreement")
        ax2.set_ylim(0, 1.02), ax2.set_ylabel("class agreement of samples")
        ax2.legend(loc="lower right", fontsize=7)
    if ax.get_legend_handles_labels()[0]:  # a non-private run has no ε over rounds to label
        ax.legend(loc="upper left", fontsize=7)
    ax.set_title("privacy spent per site and class agreement over rounds", fontsize=9)
    fig.tight_layout()
    return fig


def closest_pairs(closest: dict):
    fig, axes = plt.subplots(3, 1, figsize=(7, 3.4))
    for ax, key in zip(axes, ("synthetic", "training", "holdout")):
        _show(ax, tile(closest[key], len(closest[key])))
        ax.set_ylabel(key, rotation=0, ha="right", va="center", fontsize=8)
    dists = ", ".join(f"{d:.2f}" for d in closest["distance"])
    fig.suptitle(f"the synthetic images closest to a training image (pixel L2: {dists})", fontsize=8)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def report_figures(p: dict, report: dict) -> dict[str, tuple[str, bytes]]:
    """name → (caption, PNG bytes)."""
    figs = {
        "samples": ("Synthetic samples per class (from the evaluated set).",
                    png(class_grids(p["synthetic"], p["synthetic-labels"], p["names"]))),
        "real-vs-synthetic": ("Real held-out images (left) next to synthetic ones (right), per class.",
                              png(real_vs_synthetic(p["real"], p["real-labels"], p["synthetic"],
                                                    p["synthetic-labels"], p["names"]))),
        "rounds": ("ε per site over rounds (dashed: budget) and the class agreement of each round's checkpoint.",
                   png(over_rounds(p["rounds"], p["privacy"], report["agreement"]["over-rounds"]["per-round"]))),
    }
    if p.get("closest"):
        figs["closest-pairs"] = ("Memorization check: the 8 synthetic images nearest to any training image, with "
                                 "that training image and the nearest holdout image.", png(closest_pairs(p["closest"])))
    return figs


# --- HTML -------------------------------------------------------------------------------------------------
def fmt(x, spec: str = ".3f") -> str:
    """A statistic as 'value [lo, hi] ± std (counts)'; plain numbers and strings escaped."""
    if not isinstance(x, dict):
        return "–" if x is None else (f"{x:.4g}" if isinstance(x, float) else html.escape(str(x)))
    if "skipped" in x:
        return html.escape(f"skipped: {x['skipped']}")
    ci = f" [{x['ci95'][0]:{spec}}, {x['ci95'][1]:{spec}}]" if "ci95" in x else ""
    std = f" ± {x['std']:{spec}} (std over {x['subsets']} subsets)" if "std" in x else ""
    counts = ", ".join(f"{k}={v}" for k, v in x.items() if k.startswith("n-") or k == "n")
    return f"{x['value']:{spec}}{ci}{std} <small>({html.escape(counts)})</small>"


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _privacy(rep: dict) -> str:
    keys = ["epsilon", "delta", "epsilon-budget", "unit", "accountant", "sigma", "steps", "rounds"]
    rows = [[html.escape(site)] + [fmt(p.get(k)) for k in keys] for site, p in rep["per-site"].items()]
    audits = [_canary_audit(site, p["canary-audit"]) for site, p in rep["per-site"].items() if "canary-audit" in p]
    return table(["site"] + keys, rows) + f"<p>{html.escape(rep['note'])}</p>" + "".join(audits)


def _canary_audit(site: str, c: dict) -> str:
    """fedsynth simulate --audit-canaries: the empirical lower bound next to the accounted ε."""
    loud = " — <b>WARNING: the lower bound exceeds the accounted ε</b>" if c["exceeds-accounted"] else ""
    return (f"<p><b>{html.escape(site)} canary audit</b>: empirical ε ≥ {c['epsilon-lower-bound']:.3f} "
            f"({c['confidence']:.0%} confidence, {c['canaries']} canaries) vs accounted ε "
            f"{c['epsilon-accounted-this-run']:.3f} for this run{loud}</p>")


def _fidelity(f: dict) -> str:
    floor = f["real-floor"]
    rows = [["FID", fmt(f["fid"], ".4g"), fmt(floor["fid"], ".4g")],
            ["KID", fmt(f["kid"], ".3g"), fmt(floor["kid"], ".3g")],
            ["precision (k=3)", fmt(f["precision-recall"]["precision"]), fmt(floor["precision-recall"]["precision"])],
            ["recall (k=3)", fmt(f["precision-recall"]["recall"]), fmt(floor["precision-recall"]["recall"])]]
    per = [[html.escape(c), fmt(v.get("precision", v)), fmt(v.get("recall", v))] for c, v in f["per-class"].items()]
    return (table(["statistic", "synthetic vs real", "real half vs real half (floor)"], rows)
            + "<h3>per class</h3>" + table(["class", "precision", "recall"], per))


def _utility(u: dict) -> str:
    rows = [[name, fmt(u[key]["auc"]), ", ".join(f"{s['auc']:.3f}" for s in u[key]["per-seed"]),
             fmt(u[key]["accuracy"]), fmt(u[key]["balanced-accuracy"]), str(u[key]["n-train"]),
             str(u[key]["n-test"]), str(u[key]["n-seeds"])]
            for name, key in (("TSTR (train synthetic, test real)", "tstr"), ("TRTR (train real, test real)", "trtr"),
                              ("noise control (train noise, test real)", "noise-control"))]
    recipe = ", ".join(f"{k} {v}" for k, v in u["recipe"].items())
    return (table(["", "AUC (mean over seeds)", "AUC per seed", "accuracy", "balanced accuracy", "n train",
                   "n test", "S seeds"], rows)
            + f"<p>Recipe, fixed in advance: {html.escape(recipe)}. {html.escape(u['note'])}.</p>")


def _memorization(m: dict) -> str:
    if "skipped" in m:
        return f"<p>{fmt(m)}</p>"
    rows = [[space, fmt(m[space]["closer-to-training"]), fmt(m[space]["dcr-training-median"]),
             fmt(m[space]["dcr-holdout-median"]), fmt(m[space]["dcr-training-p05"]),
             fmt(m[space]["dcr-holdout-p05"])] for space in ("pixel", "feature")]
    return (table(["space", "share closer to training", "median DCR training", "median DCR holdout",
                   "5% DCR training", "5% DCR holdout"], rows)
            + f"<p>{m['n-synthetic']} synthetic images; {m['n-members']} training (member) and {m['n-nonmembers']} "
              f"holdout (non-member) images. {html.escape(m['ideal'])}.</p>")


def _mia(m: dict) -> str:
    if "skipped" in m:
        return f"<p>{fmt(m)}</p>"
    rows = [[kind, html.escape(m[kind].get("attack", "")), fmt(m[kind].get("auc", m[kind]))]
            for kind in ("black-box", "white-box")]
    return (table(["attack", "score", "AUC members vs non-members"], rows)
            + f"<p>{m['n-members']} members (sites' training images) and {m['n-nonmembers']} non-members (sites' "
              f"local holdouts); {html.escape(m['sets'])}. AUC 0.5: the attack can't tell them apart.</p>")


def _agreement(a: dict) -> str:
    final = a["final"]
    if not final:
        return "<p>no agreement.json in the run folder</p>"
    per = ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in final["per-class"].items())
    return (f"<p>A classifier trained on real images labels class-c samples as c: {final['agreement']:.3f} ({per}; "
            f"{final['samples-per-class']} samples per class).</p>")


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
       "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
       "small{color:#666}.warn{background:#fff3cd;padding:.5em}img{max-width:100%}")


def render_html(report: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    from .report import headline

    run, ev = report["run"], report["evaluation"]
    pictures = "".join(f"<figure><img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                       for name, (caption, data) in figures.items())
    title = f"fedsynth release report: {html.escape(run['run-id'])}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>{CSS}</style></head><body>
<h1>Synthetic-data release report: {html.escape(run['run-id'])}</h1>
<p>{html.escape(run['model'])} generator, {run['sites']} sites, {run['rounds']} rounds, secure aggregation
{'on' if run['secure-aggregation'] else 'off'}. {ev['n-synthetic']} synthetic images (seed {ev['seed']}) against
{ev['n-real-reference']} real images of the <b>{html.escape(ev['real-reference-split'])}</b> split of
{html.escape(ev['data'])}. Features: {html.escape(ev['feature-network'])}. Intervals: 95% bootstrap.</p>
<p class="warn">This page shows real images (held-out and, under memorization, the sites' training images).
Keep it with the data owners unless those images are public.</p>
<h2 id="summary">Summary</h2><ul>{''.join(f'<li>{html.escape(line)}</li>' for line in headline(report))}</ul>
<h2 id="privacy">Privacy</h2>{_privacy(report['privacy'])}
<h2 id="fidelity">Fidelity</h2>{_fidelity(report['fidelity'])}
<h2 id="utility">Utility</h2>{_utility(report['utility'])}
<h2 id="memorization">Memorization (distance to closest record)</h2>{_memorization(report['memorization'])}
<h2 id="membership-inference">Membership inference</h2>{_mia(report['membership-inference'])}
<h2 id="agreement">Class agreement</h2>{_agreement(report['agreement'])}
<h2 id="pictures">Pictures</h2>{pictures}
</body></html>
"""
