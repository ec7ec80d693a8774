"""The site's own Ed25519 signing key, and the canonical JSON form that entries are hashed and signed in.

The key is created on first use next to the ledger: ``site.key`` (PKCS#8 PEM, unencrypted, mode 0600, never
leaves the site) and ``site.pub`` (SubjectPublicKeyInfo PEM, safe to publish). A key is named by its
fingerprint: sha256 of the 32 raw public-key bytes, in hex. Both files are standard PEM, so
``openssl pkey -in site.key -pubout`` reproduces ``site.pub``.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsynth.files import atomic_write


class KeyFileError(ValueError):
    """A key file that can't be used; the message names the file."""


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON object that is hashed and signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pub_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public(key)).decode()


def fingerprint(key: Ed25519PublicKey | str) -> str:
    """sha256 (hex) of the raw public key; accepts the key or its base64 form as stored in entries."""
    raw = base64.b64decode(key, validate=True) if isinstance(key, str) else raw_public(key)
    return sha256_hex(raw)


def public_from_b64(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))


def sign(key: Ed25519PrivateKey, body: dict[str, Any]) -> str:
    return base64.b64encode(key.sign(canonical(body))).decode()


def signature_ok(pub: Ed25519PublicKey, body: dict[str, Any], sig: str) -> bool:
    try:
        pub.verify(base64.b64decode(sig, validate=True), canonical(body))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def key_paths(key_path: Path) -> tuple[Path, Path]:
    key_path = Path(key_path)
    return key_path, key_path.with_suffix(".pub")


def load_private(key_path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{key_path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public(pub_path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(pub_path).read_bytes())
    except ValueError as exc:
        raise KeyFileError(f"{pub_path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{pub_path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def create_key(key_path: Path) -> Ed25519PrivateKey:
    """A fresh key at ``key_path`` (0600) and its public half beside it; never overwrites an existing key."""
    key_path, pub_path = key_paths(key_path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(key_path, pem, 0o600)
    write_public(key, pub_path)
    return key


def write_public(key: Ed25519PrivateKey, pub_path: Path) -> None:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(pub_path, pem)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, and fail if it already exists."""
    atomic_write(path, data, mode, exclusive=True)