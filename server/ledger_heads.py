"""The ledger heads sites send with their updates, recorded by the server (``RUN_DIR/ledger-heads.json``).

Each site sends, beside its weights, the seq and sha256 of the ledger entry that charged the round
(``client.client_app.ledger_anchor``). They are fit metrics, which reach the server under SecAgg+ too (only
the arrays are masked). The server keeps them per round in ``metrics.json`` / the round's checkpoint and
gathers them into ``ledger-heads.json``, the file ``fedsynth audit --anchors`` reads (``privacy/anchors.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from privacy.anchors import HEADS_FILE, HEX64

from .checkpoint import write_json

log = logging.getLogger("fedsynth.server")


def heads_from_results(server_round: int, results) -> dict[str, dict[str, Any]]:
    """{site: {"seq", "sha256"}} from a round's fit results; a malformed head is logged and left out."""
    heads = {}
    for _, res in results:
        m = res.metrics
        site, seq, sha = str(m.get("site")), m.get("ledger-seq"), m.get("ledger-head")
        if isinstance(seq, int) and seq >= 0 and isinstance(sha, str) and HEX64.match(sha):
            heads[site] = {"seq": seq, "sha256": sha}
        else:
            log.warning("round %d: %s sent no valid ledger head (ledger-seq=%r, ledger-head=%r)",
                        server_round, site, seq, sha)
    return heads


def write_ledger_heads(run_dir: Path, run_id: str, rounds: list[dict[str, Any]]) -> None:
    anchors = [{"round": r["round"], "site": site, **head}
               for r in rounds for site, head in sorted(r.get("ledger-heads", {}).items())]
    write_json(Path(run_dir) / HEADS_FILE, {"run_id": run_id, "anchors": anchors})
