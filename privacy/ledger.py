"""The site's privacy ledger: an append-only, hash-chained, signed JSON-lines file the site owns.

Entry kinds:
- ``plan``: σ calibrated once for a run (budget, q, steps per round, rounds agreed to, the site's policy);
- ``charge``: DP-SGD steps whose result left the site (mechanism, σ, C, q, steps, unit, accountant, ε after,
  what was released and the sha256 of the weights) — these are what ε composes; round 0's class-mean
  release (``released`` = ``class-means``) is one Gaussian mechanism, recorded as one step at q = 1;
- ``refusal``: a round the site declined, with the rule it broke (nothing left the site, nothing charged).

Every line is the canonical JSON (``privacy.keys.canonical``) of one entry, which carries

- ``v`` (format, 2), ``seq`` (0, 1, 2, … in file order) and ``prev``: sha256 (hex) of the previous line's
  canonical JSON (64 zeros for the first entry);
- ``pub``: the site's Ed25519 public key (base64 of the 32 raw bytes) and ``sig``: its signature (base64)
  over the canonical JSON of every other field.

Beside the ledger: ``site.key`` / ``site.pub`` (the key pair, made on first use), ``LEDGER.head`` (the signed
seq and hash of the last entry: removing entries from the end shows) and ``LEDGER.lock`` (an ``flock`` that
serializes writers across processes). An append rewrites the whole file to a temp file, fsyncs it and renames
it over the ledger, then does the same for the head: a crash at any point leaves a ledger that verifies
(at worst its last entry is not yet under the head; the next append covers it).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from fedsynth.files import atomic_write

from .keys import (KeyFileError, canonical, create_key, fingerprint, key_paths, load_private, pub_b64, sha256_hex,
                   sign, write_public)

FORMAT = 2
GENESIS = "0" * 64
KINDS = ("plan", "charge", "refusal")
MECHANISM = "subsampled-gaussian"
RELEASED = ("weights", "failure-notice", "class-means")  # class-means: round 0's release (privacy/class_means.py)
RESERVED = ("v", "seq", "prev", "pub", "sig")
Step = tuple[float, float, int]


class LedgerError(ValueError):
    """A ledger file that can't be read or written as a ledger; names the file and line."""


def entry_hash(entry: dict[str, Any]) -> str:
    """What the next entry's ``prev`` (and the head) records: sha256 of the entry's canonical JSON."""
    return sha256_hex(canonical(entry))


def weights_sha256(arrays: Iterable[Any]) -> str:
    """sha256 over the ordered weight arrays that leave a site: each array's dtype, shape and C-order bytes."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{tuple(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Ledger:
    path: Path
    key_path: Path | None = None  # default: site.key beside the ledger

    def __post_init__(self):
        self.path = Path(self.path)
        self.key_path = Path(self.key_path) if self.key_path else self.path.parent / "site.key"

    @property
    def pub_path(self) -> Path:
        return key_paths(self.key_path)[1]

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # --- reading ------------------------------------------------------------------------------------
    def lines(self, text: str | None = None) -> list[tuple[int, dict[str, Any]]]:
        """(line number, entry) for every non-blank line; raises LedgerError naming file:line for a bad one."""
        if text is None:
            if not self.path.exists():
                return []
            text = self.path.read_text()
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
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
                    if not isinstance(entry.get(key), (int, float)) or isinstance(entry.get(key), bool):
                        raise LedgerError(f"{self.path}:{lineno}: charge entry needs a number in {key!r}")
            out.append((lineno, entry))
        return out

    def entries(self) -> list[dict[str, Any]]:
        return [e for _, e in self.lines()]

    @contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """The inter-process lock every writer holds (readers that need ledger + head together share it)."""
        if shared and not self.lock_path.exists():
            yield  # nothing was ever written here (or a read-only copy): nothing to serialize against
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def snapshot(self) -> tuple[str, str | None]:
        """The ledger's and the head's text, read together under the shared lock."""
        with self.locked(shared=True):
            text = self.path.read_text() if self.path.exists() else ""
            head = self.head_path.read_text() if self.head_path.exists() else None
        return text, head

    def stray_temp_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.*"))

    # --- writing ------------------------------------------------------------------------------------
    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Chain, sign and append one entry atomically under the writers' lock; returns the entry as written."""
        if entry.get("kind") not in KINDS:
            raise ValueError(f"ledger entry kind must be one of {KINDS}")
        clash = sorted(set(entry) & set(RESERVED))
        if clash:
            raise ValueError(f"ledger entry: {clash} are set by the ledger itself")
        with self.locked():
            for tmp in self.stray_temp_files():  # only a writer holding this lock makes them: a crashed one
                tmp.unlink(missing_ok=True)
            old = self.path.read_text() if self.path.exists() else ""
            parsed = self.lines(old)
            key = self._signing_key(parsed)
            pub = pub_b64(key.public_key())
            if parsed:
                lineno, last = parsed[-1]
                if last.get("pub") != pub or not isinstance(last.get("seq"), int):
                    raise LedgerError(
                        f"{self.path}:{lineno}: the last entry is not signed by {self.key_path} (key "
                        f"{fingerprint(key.public_key())[:16]}); refusing to extend a chain it did not sign "
                        "(run `fedsynth audit` on this ledger)")
                seq, prev = last["seq"] + 1, entry_hash(last)
            else:
                seq, prev = 0, GENESIS
            body = {"time": round(time.time(), 3), **entry, "v": FORMAT, "seq": seq, "prev": prev, "pub": pub}
            try:
                body["sig"] = sign(key, body)
                line = canonical(body).decode()
            except ValueError as exc:  # NaN / inf in a field: not JSON
                raise ValueError(f"ledger entry {entry.get('kind')}: {exc}") from None
            if old and not old.endswith("\n"):
                old += "\n"
            atomic_write(self.path, (old + line + "\n").encode())
            head = {"v": FORMAT, "ledger": self.path.name, "seq": seq, "sha256": entry_hash(body),
                    "time": body["time"], "pub": pub}
            head["sig"] = sign(key, head)
            atomic_write(self.head_path, canonical(head) + b"\n")
        return body

    def _signing_key(self, parsed: list[tuple[int, dict[str, Any]]]):
        key_path, pub_path = key_paths(self.key_path)
        if not key_path.exists():
            if parsed:
                raise LedgerError(f"{key_path}: missing, but {self.path} already holds {len(parsed)} entries; "
                                  "restore the site's key (a new key would break the chain)")
            return create_key(key_path)
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise LedgerError(f"{key_path}: permissions {oct(mode)} let others read the site's signing key; "
                              f"run `chmod 600 {key_path}`")
        try:
            key = load_private(key_path)
        except KeyFileError as exc:
            raise LedgerError(str(exc)) from None
        if not pub_path.exists():
            write_public(key, pub_path)
        return key

    def verify(self, expect_keys: Iterable[str] = ()) -> dict[str, Any]:
        from .verify import verify_ledger
        return verify_ledger(self, expect_keys)

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
        from .accountant import epsilon  # imported late: a plain ledger reader/writer needs no torch
        return epsilon(self.history(), delta, accountant)

    def rounds(self) -> list[tuple[str, int]]:
        return [(e.get("run_id", ""), int(e.get("round", 0))) for e in self.charges()]
