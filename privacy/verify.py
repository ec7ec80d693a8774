"""Verify a ledger's hash chain, signatures and head; name every entry that was edited, removed or reordered.

What each check catches (a problem names the file:line, the entry's kind, run and round):

- ``unsigned``: a line without the format-2 fields (``v``, ``seq``, ``prev``, ``pub``, ``sig``);
- ``key``: an entry (or the head) signed by another key than the site's (``site.pub``, or ``--expect-key``);
- ``edited``: a signature that no longer matches its entry, or an entry whose hash no longer matches the
  ``prev`` its successor (or the head) recorded;
- ``removed``: a gap in ``seq``, a first entry that is not seq 0, or a ledger shorter than its signed head;
- ``reordered`` / ``duplicated``: ``seq`` out of file order, or twice;
- ``head``: the head file missing, unreadable, or more than one entry behind the ledger.

Whoever holds ``site.key`` can still rewrite the whole ledger and re-sign it; pin the key's fingerprint
(``fedsynth audit --expect-key``) and keep a copy of the head elsewhere to catch that too.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from .keys import KeyFileError, fingerprint, load_private, load_public, pub_b64, public_from_b64, signature_ok

if TYPE_CHECKING:
    from .ledger import Ledger

SIGNED_FIELDS = ("v", "seq", "prev", "pub", "sig")


def verify_ledger(ledger: "Ledger", expect_keys: Iterable[str] = ()) -> dict[str, Any]:
    from .ledger import FORMAT, GENESIS, entry_hash

    text, head_text = ledger.snapshot()
    parsed = ledger.lines(text)  # raises LedgerError naming file:line for a line that isn't an entry
    problems: list[dict[str, Any]] = []
    notes: list[str] = []

    def flag(kind: str, message: str, line: int | None = None, entry: dict[str, Any] | None = None) -> None:
        entry = entry or {}
        problems.append({"kind": kind, "where": f"{ledger.path}:{line}" if line else str(ledger.path),
                         "line": line, "entry": entry.get("kind"), "run_id": entry.get("run_id"),
                         "round": entry.get("round"), "seq": entry.get("seq"), "message": message})

    trusted, source = _trusted_key(ledger, parsed, flag)
    expect = [k.lower() for k in expect_keys]
    for k in expect:
        if len(k) < 16 or any(c not in "0123456789abcdef" for c in k):
            raise ValueError(f"expected key {k!r}: give the key's sha256 fingerprint in hex, at least its first 16 "
                             "digits (the audit prints it)")
    fp = fingerprint(trusted) if trusted else None
    if expect and (fp is None or not any(fp.startswith(k) for k in expect)):
        flag("key", f"the site's key {fp and fp[:16]} (from {source}) is none of the expected keys {expect}")

    # 1. each entry on its own: signed, by the site's key, unchanged since.
    signed: list[tuple[int, dict[str, Any]]] = []
    edited: set[int] = set()
    for lineno, e in parsed:
        missing = [k for k in SIGNED_FIELDS if k not in e]
        if missing or e.get("v") != FORMAT or not isinstance(e.get("seq"), int):
            flag("unsigned", f"not a signed format-{FORMAT} entry (missing or bad {missing or 'v/seq'}): written "
                 "before ledgers were signed, or by something else", lineno, e)
            continue
        signed.append((lineno, e))
        if trusted and e["pub"] != trusted:
            flag("key", f"signed by key {_fp(e['pub'])}, not the site's key {fp[:16]} ({source})", lineno, e)
            edited.add(lineno)
            continue
        body = {k: v for k, v in e.items() if k != "sig"}
        try:
            ok = signature_ok(public_from_b64(e["pub"]), body, e["sig"])
        except ValueError:
            ok = False
        if not ok:
            flag("edited", "signature does not match the entry: it was changed after it was written", lineno, e)
            edited.add(lineno)

    # 2. order: seq must run 0, 1, 2, … in file order.
    seqs = [e["seq"] for _, e in signed]
    seen: dict[int, int] = {}
    for (lineno, e), want in zip(signed, sorted(seqs)):
        if e["seq"] in seen:
            flag("duplicated", f"entry seq {e['seq']} appears again (first at line {seen[e['seq']]})", lineno, e)
        elif e["seq"] != want:
            flag("reordered", f"holds entry seq {e['seq']} where seq {want} belongs: entries were reordered",
                 lineno, e)
        seen.setdefault(e["seq"], lineno)
    by_seq = {e["seq"]: (lineno, e) for lineno, e in signed}
    expected = 0
    for s in sorted(by_seq):
        if s > expected:
            lineno, e = by_seq[s]
            before = by_seq.get(expected - 1)
            where = f"after line {before[0]} ({_label(before[1])}) and " if before else ""
            flag("removed", f"entries seq {expected}..{s - 1} are missing {where}before this entry: removed",
                 lineno, e)
        expected = s + 1

    # 3. the chain: each entry records the hash of the one before it.
    for s, (lineno, e) in by_seq.items():
        prev = by_seq.get(s - 1)
        if s == 0 and e["prev"] != GENESIS:
            flag("removed", "first entry does not start the chain (prev is not the genesis hash): entries "
                 "before it were removed", lineno, e)
        elif prev and e["prev"] != entry_hash(prev[1]) and prev[0] not in edited:
            edited.add(prev[0])
            flag("edited", f"its hash no longer matches the one line {lineno} ({_label(e)}) recorded: it was "
                 "changed after that entry was written", prev[0], prev[1])

    # 4. the head: the signed seq and hash of the last entry (catches entries removed from the end).
    head_seq = _check_head(ledger, head_text, trusted, by_seq, edited, flag, notes, entry_hash)
    strays = ledger.stray_temp_files()
    if strays:
        notes.append(f"ignored {len(strays)} temp file(s) left by an interrupted write: "
                     f"{[p.name for p in strays]} (the next append removes them)")
    problems.sort(key=lambda p: p["line"] or 0)  # file-level first, then in file order
    return {"ok": not problems, "ledger": str(ledger.path), "key": fp, "key_source": source,
            "entries": len(parsed), "head_seq": head_seq, "problems": problems, "notes": notes}


def _trusted_key(ledger: "Ledger", parsed, flag) -> tuple[str | None, str]:
    """The site's public key (base64): from site.pub, else from site.key, else (flagged) the first entry's."""
    try:
        if ledger.pub_path.exists():
            return pub_b64(load_public(ledger.pub_path)), str(ledger.pub_path)
        if ledger.key_path.exists():
            return pub_b64(load_private(ledger.key_path).public_key()), str(ledger.key_path)
    except KeyFileError as exc:
        flag("key", str(exc))
        return None, "unreadable key file"
    if not parsed:
        return None, "no key yet"
    first = parsed[0][1].get("pub")
    flag("key", f"no {ledger.pub_path.name} next to the ledger: can't tell whose key should have signed it "
         f"(copy the site's {ledger.pub_path.name} here, or pin it with --expect-key)")
    return (first if isinstance(first, str) else None), "the first entry (unpinned)"


def _check_head(ledger, head_text, trusted, by_seq, edited, flag, notes, entry_hash) -> int | None:
    if not by_seq:
        return None
    last = max(by_seq)
    last_line, last_entry = by_seq[last]
    if head_text is None:
        if len(by_seq) > 1:
            flag("head", f"{ledger.head_path.name} is missing: every append rewrites it, so it was removed")
        else:
            notes.append(f"{ledger.head_path.name} not written yet (a crash right after the first entry)")
        return None
    try:
        head = json.loads(head_text)
        body = {k: v for k, v in head.items() if k != "sig"}
        ok = head.get("pub") == trusted and signature_ok(public_from_b64(head["pub"]), body, head["sig"])
        head_seq = int(head["seq"])
    except (ValueError, KeyError, TypeError, AttributeError):
        flag("head", f"{ledger.head_path}: not a signed head record")
        return None
    if not ok:
        flag("head" if head.get("pub") == trusted else "key",
             f"{ledger.head_path}: signature does not verify with the site's key: the head was replaced or edited")
        return head_seq
    if head_seq > last:
        flag("removed", f"the signed head says the ledger ends at entry seq {head_seq}, but it ends at seq {last}: "
             f"entries seq {last + 1}..{head_seq} were removed from the end", last_line, last_entry)
    elif head_seq in by_seq:
        line, entry = by_seq[head_seq]
        if entry_hash(entry) != head["sha256"] and line not in edited:
            flag("edited", "its hash no longer matches the signed head: it was changed after it was written",
                 line, entry)
        if last - head_seq == 1:
            notes.append(f"the last entry (line {last_line}) is not under the signed head yet: a write was "
                         "interrupted between the ledger and its head; the next append covers it")
        elif last - head_seq > 1:
            flag("head", f"{last - head_seq} entries after the signed head (seq {head_seq}); an append moves the "
                 "head each time, so they were added by something else", last_line, last_entry)
    return head_seq


def _fp(pub: Any) -> str:
    try:
        return fingerprint(pub)[:16]
    except (ValueError, TypeError):
        return "<unreadable>"


def _label(e: dict[str, Any]) -> str:
    rnd = f" round {e['round']}" if e.get("round") is not None else ""
    return f"{e.get('kind')} run {e.get('run_id')}{rnd}"


def describe(problem: dict[str, Any]) -> str:
    rnd = f" round {problem['round']}" if problem["round"] is not None else ""
    what = f" ({problem['entry']} run {problem['run_id']}{rnd})" if problem["entry"] else ""
    return f"{problem['where']}{what}: {problem['kind']}: {problem['message']}"

