"""Whole-or-nothing file writes: a temp file in the same folder, fsync, rename over, fsync the folder."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644, exclusive: bool = False) -> None:
    """``exclusive``: fail with FileExistsError, writing nothing, if ``path`` exists (a key never overwritten)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)  # unlike a rename, a link never replaces an existing file
            Path(tmp).unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json_object(path: Path, what: str, error: type[Exception] = ValueError) -> dict:
    """A JSON object from ``path``, or ``error`` naming the file and what was expected (``what``)."""
    import json

    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise error(f"{path}: expected a JSON object of {what}, got {type(values).__name__}")
    return values
