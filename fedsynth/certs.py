"""Certificates and keys for a real deployment: a CA, the SuperLink's TLS certificate, one key per hospital.

Layout of the folder ``fedsynth certs DIR`` writes (folders 0700, private keys 0600):

    DIR/ca.crt                       the CA certificate: every hospital and the SuperLink get a copy
    DIR/ca.key                       the CA's private key: keep it offline, it issues server certificates
    DIR/superlink/server.crt, .key   the SuperLink's TLS certificate (SANs from --dns/--ip) and its key
    DIR/hospitals/NAME/node.key      NAME's SuperNode authentication key (ECDSA P-384, OpenSSH format)
    DIR/hospitals/NAME/node.pub      its public half (OpenSSH line), registered at the SuperLink

Flower 1.42 reads node keys with ``load_ssh_private_key`` (flower-supernode --auth-supernode-private-key) and
``load_ssh_public_key`` (flwr supernode register), on a NIST curve: hence OpenSSH encoding and P-384.
TLS keys are P-384 too, as PKCS#8 PEM. An existing key is never overwritten without ``force``.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import atomic_write

CURVE = ec.SECP384R1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertError(ValueError):
    """A certificate or key that can't be made or used; the message names the file."""


@dataclass(frozen=True)
class CertPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    def node_key(self, hospital: str) -> Path:
        return self.root / "hospitals" / hospital / "node.key"

    def node_pub(self, hospital: str) -> Path:
        return self.root / "hospitals" / hospital / "node.pub"

    def node_pubs(self) -> list[Path]:
        return sorted((self.root / "hospitals").glob("*/node.pub"))


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertError(f"refusing to overwrite existing key(s) {', '.join(existing)}: pass --force to replace "
                        "them (anything issued with or registered for the old key stops working)")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def create_ca(paths: CertPaths, days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name("fedsynth CA")).issuer_name(_name("fedsynth CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    _private_dir(paths.root)
    atomic_write(paths.ca_key, _pem_key(key), 0o600)
    atomic_write(paths.ca_cert, _pem_cert(cert))
    return cert, key


def load_file(path: Path, loader: Callable[[bytes], Any], what: str, flag: str = "") -> Any:
    """``loader(bytes of path)``, with an error that names the flag, the file and what it should hold."""
    where = f"{flag}: {path}" if flag else str(path)
    try:
        return loader(Path(path).read_bytes())
    except FileNotFoundError:
        raise CertError(f"{where} does not exist (expected {what})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{where}: not {what} ({exc})") from None


def load_cert(path: Path, flag: str = "") -> x509.Certificate:
    return load_file(path, x509.load_pem_x509_certificate, "a PEM certificate", flag)


def load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_cert(paths.ca_cert)
    key = load_file(paths.ca_key, lambda b: serialization.load_pem_private_key(b, password=None),
                    "an unencrypted PEM private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{paths.ca_key}: not the private key of {paths.ca_cert}")
    return cert, key


def parse_sans(dns: list[str], ips: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in dns:
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*",
                            name):
            raise CertError(f"--dns: {name!r} is not a DNS name (letters, digits, '-', dots)")
        names.append(x509.DNSName(name))
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(f"--ip: {ip!r} is not an IPv4 or IPv6 address") from None
    if not names:
        raise CertError("the SuperLink certificate needs at least one --dns NAME or --ip ADDRESS (the names the "
                        "hospitals use to reach it)")
    return names


def issue_server_cert(paths: CertPaths, dns: list[str], ips: list[str], days: int = 825,
                      force: bool = False) -> x509.Certificate:
    """The SuperLink's TLS certificate, signed by the CA, valid for exactly the given names."""
    sans = parse_sans(dns, ips)
    _refuse_overwrite([paths.server_key], force)
    ca_cert, ca_key = load_ca(paths)
    key = ec.generate_private_key(CURVE())
    now = _now()
    first = sans[0].value
    cert = (x509.CertificateBuilder().subject_name(_name(str(first))).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _private_dir(paths.server_key.parent)
    atomic_write(paths.server_key, _pem_key(key), 0o600)
    atomic_write(paths.server_cert, _pem_cert(cert))
    return cert


def check_hospital_name(hospital: str) -> None:
    if not NAME_PATTERN.fullmatch(hospital):
        raise CertError(f"--hospital: {hospital!r} is not a usable name (letters, digits, '.', '_', '-'; "
                        "at most 64 characters, starting with a letter or digit)")


def create_node_key(paths: CertPaths, hospital: str, force: bool = False) -> Path:
    """One hospital's SuperNode authentication key pair (OpenSSH encoding, as Flower reads it)."""
    check_hospital_name(hospital)
    key_path, pub_path = paths.node_key(hospital), paths.node_pub(hospital)
    _refuse_overwrite([key_path], force)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _private_dir(paths.root / "hospitals")
    _private_dir(key_path.parent)
    atomic_write(key_path, private, 0o600)
    atomic_write(pub_path, public + f" fedsynth-{hospital}\n".encode())
    return key_path


def make_certs(root: Path, dns: list[str], ips: list[str], hospitals: list[str], days: int = 825,
               force: bool = False) -> list[Path]:
    """Create the CA if ``root`` has none (else reuse it), issue the server certificate when names are given
    (or when none exists yet) and one node key per hospital. Returns the files written."""
    paths = CertPaths(Path(root))
    if len(set(hospitals)) != len(hospitals):
        raise CertError(f"--hospital: names repeat in {hospitals}")
    written: list[Path] = []
    # Check every overwrite before writing anything: a refused call leaves the folder as it was.
    if dns or ips or not paths.server_cert.exists():
        parse_sans(dns, ips)
        _refuse_overwrite([paths.server_key], force)
    for h in hospitals:
        check_hospital_name(h)
        _refuse_overwrite([paths.node_key(h)], force)
    if not paths.ca_key.exists():
        if paths.ca_cert.exists():
            raise CertError(f"{paths.ca_cert} exists without {paths.ca_key}: the CA can't issue certificates "
                            "here; use the folder that holds its key, or move ca.crt away to start a new CA")
        _private_dir(paths.root)
        create_ca(paths)
        written += [paths.ca_cert, paths.ca_key]
    if dns or ips or not paths.server_cert.exists():
        issue_server_cert(paths, dns, ips, days, force)
        written += [paths.server_cert, paths.server_key]
    for h in hospitals:
        create_node_key(paths, h, force)
        written += [paths.node_key(h), paths.node_pub(h)]
    return written


def check_chain(cert_path: Path, ca_path: Path) -> x509.Certificate:
    """The certificate at ``cert_path``, checked to be signed by the CA at ``ca_path`` and valid now."""
    cert, ca = load_cert(cert_path), load_cert(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{cert_path}: not issued by the CA in {ca_path} ({exc})") from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(f"{cert_path}: valid only from {cert.not_valid_before_utc} to {cert.not_valid_after_utc}")
    return cert


def load_node_public(pub_path: Path) -> ec.EllipticCurvePublicKey:
    """A hospital's node.pub as Flower will read it (OpenSSH, NIST curve); a clear error otherwise."""
    key = load_file(pub_path, serialization.load_ssh_public_key, "an OpenSSH public key")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{pub_path}: expected an ECDSA (NIST P-256/384/521) key, got {type(key).__name__}")
    return key


def load_node_private(key_path: Path, flag: str = "") -> ec.EllipticCurvePrivateKey:
    key = load_file(key_path, lambda b: serialization.load_ssh_private_key(b, password=None),
                    "an unencrypted OpenSSH private key (node.key)", flag)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: expected an ECDSA key, got {type(key).__name__}")
    return key
