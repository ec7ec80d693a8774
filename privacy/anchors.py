"""Ledger heads anchored at the server: what catches a ledger rewritten and re-signed with the site's own key.

After each round's charge a site sends the seq and sha256 of that ledger entry (the head of its ledger right
then) beside its weights; the server records them per round in ``RUN_DIR/ledger-heads.json``::

    {"run_id": "...", "anchors": [{"round": 1, "site": "site-0", "seq": 3, "sha256": "<64 hex>"}, ...]}

Whoever holds ``site.key`` can rewrite the ledger and re-sign every entry so that the chain, the signatures
and the head all verify again — but the rewritten entry (or any entry before it: every entry's hash covers
its predecessor's) no longer hashes to what the server recorded. ``check_anchors`` checks that every anchored
entry is still in the chain, at its seq, with the same hash; ``fedsynth audit LEDGER --anchors RUN_DIR``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from .ledger import Ledger, entry_hash

HEADS_FILE = "ledger-heads.json"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def load_anchors(path: Path) -> list[dict[str, Any]]:
    """The anchors in a run folder's ledger-heads.json (or that file given directly), each with its ``source``."""
    path = Path(path)
    file = path / HEADS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file; expected a run folder holding {HEADS_FILE}, or that file")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("anchors"), list):
        raise ValueError(f"{file}: expected an object with \"anchors\": [{{round, site, seq, sha256}}, ...]")
    out = []
    for i, a in enumerate(doc["anchors"]):
        ok = (isinstance(a, dict) and isinstance(a.get("site"), str) and _whole(a.get("round"))
              and _whole(a.get("seq")) and isinstance(a.get("sha256"), str) and HEX64.match(a["sha256"]))
        if not ok:
            raise ValueError(f"{file}: anchors[{i}] is {a!r}; expected {{\"round\": int, \"site\": str, "
                             "\"seq\": int ≥ 0, \"sha256\": 64 lowercase hex digits}")
        out.append({"round": int(a["round"]), "site": a["site"], "seq": int(a["seq"]), "sha256": a["sha256"],
                    "run_id": str(doc.get("run_id", "")), "source": str(file)})
    return out


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def site_names(ledger: Ledger) -> set[str]:
    """The names a ledger answers to: its folder's name and every ``site`` its entries recorded."""
    names = {ledger.path.parent.name}
    return names | {str(e["site"]) for e in ledger.entries() if e.get("site")}


def check_anchors(ledger: Ledger, anchors: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Every anchor of this site must still be in the ledger at its seq with the same hash.

    Returns ``{"checked": n, "problems": [...], "notes": [...]}``; problems are shaped like
    ``privacy.verify``'s (kind ``anchor``), naming the round and run the server anchored.
    """
    names = site_names(ledger)
    mine = [a for a in anchors if a["site"] in names]
    by_seq = {e.get("seq"): (lineno, e) for lineno, e in ledger.lines()}
    problems, notes = [], []
    for a in mine:
        what = f"round {a['round']} of run {a['run_id']} (anchored by the server in {a['source']})"
        found = by_seq.get(a["seq"])
        if found is None:
            message = (f"{what}: the server recorded entry seq {a['seq']} with sha256 {a['sha256'][:16]}…, but the "
                       "ledger has no entry with that seq: it was removed or the ledger rewritten")
            line, entry = None, {"run_id": a["run_id"], "round": a["round"], "seq": a["seq"]}
        elif entry_hash(found[1]) != a["sha256"]:
            line, entry = found
            message = (f"{what}: the server recorded entry seq {a['seq']} with sha256 {a['sha256'][:16]}…, but it "
                       f"now hashes to {entry_hash(entry)[:16]}…: this entry or one before it was rewritten after "
                       "that round (re-signing does not restore the hash)")
        else:
            continue
        problems.append({"kind": "anchor", "where": f"{ledger.path}:{line}" if line else str(ledger.path),
                         "line": line, "entry": entry.get("kind", "charge"), "run_id": a["run_id"],
                         "round": a["round"], "seq": a["seq"], "message": message})
    if not mine:
        sources = sorted({a["source"] for a in anchors})
        notes.append(f"no anchored head names this site ({sorted(names)}) in {sources}")
    return {"checked": len(mine), "problems": problems, "notes": notes}
