"""The site's privacy ledger: an append-only JSON-lines file the site owns, composed across rounds and runs.

Entry kinds:
- ``plan``: σ calibrated once for a run (budget, q, steps per round, rounds agreed to);
- ``charge``: DP-SGD steps whose result left the site (σ, C, q, steps, ε after) — these are what ε composes;
- ``refusal``: a round the site declined, with the rule it broke (nothing left the site, nothing charged).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .accountant import Step, epsilon

KINDS = ("plan", "charge", "refusal")


class LedgerError(ValueError):
    """A ledger file that can't be read as a ledger; names the file and line."""


@dataclass
class Ledger:
    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for lineno, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LedgerError(f"{self.path}:{lineno}: not a JSON object ({exc.msg})") from None
            if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
                raise LedgerError(f"{self.path}:{lineno}: expected an object with kind in {KINDS}")
            if entry["kind"] == "charge":
                for key in ("sigma", "clip", "sample_rate", "steps", "delta"):
                    if not isinstance(entry.get(key), (int, float)):
                        raise LedgerError(f"{self.path}:{lineno}: charge entry needs a number in {key!r}")
            out.append(entry)
        return out

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one entry atomically: the whole file is rewritten to a temp file and renamed over."""
        if entry.get("kind") not in KINDS:
            raise ValueError(f"ledger entry kind must be one of {KINDS}")
        entry = {"time": round(time.time(), 3), **entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.path.read_text() if self.path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(old + json.dumps(entry, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return entry

    # --- what the entries mean -------------------------------------------------------------------
    def charges(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["kind"] == "charge"]

    def history(self) -> list[Step]:
        return [(e["sigma"], e["sample_rate"], e["steps"]) for e in self.charges()]

    def plan(self, run_id: str) -> dict[str, Any] | None:
        plans = [e for e in self.entries() if e["kind"] == "plan" and e.get("run_id") == run_id]
        return plans[-1] if plans else None

    def history_before(self, run_id: str) -> list[Step]:
        return [(e["sigma"], e["sample_rate"], e["steps"]) for e in self.charges() if e.get("run_id") != run_id]

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        return epsilon(self.history(), delta, accountant)

    def rounds(self) -> list[tuple[str, int]]:
        return [(e.get("run_id", ""), int(e.get("round", 0))) for e in self.charges()]
