"""A public fingerprint of a model's layout: the ordered names of the arrays that leave a site.

Flower's legacy path sends a site's update as a bare list of arrays; the site adds this fingerprint to its
fit metrics and the server compares it with its own model's (server/update_check.py), so an update built for
another layout is refused by name, not only when a shape happens to differ.
"""
from __future__ import annotations

import hashlib
from typing import Iterable


def names_sha256(names: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()
