"""`fedsynth certs`: a CA, the SuperLink's TLS certificate with the SANs asked for, one ECDSA P-384 node key per
hospital in the encoding Flower reads; owner-only permissions; nothing overwritten without --force.

The chain and the names are checked with cryptography's own X.509 path validation (a verifier independent of
how `fedsynth certs` built the certificate); the keys are read the way flower-supernode and
`flwr supernode register` read them (load_ssh_private_key / load_ssh_public_key)."""
from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedsynth.cli import main


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def certs(tmp_path):
    root = tmp_path / "certs"
    assert main(["certs", str(root), "--dns", "coordinator.example.org", "--dns", "localhost", "--ip", "127.0.0.1",
                 "--ip", "10.1.2.3", "--hospital", "st-anna", "--hospital", "charite"]) == 0
    return root


def test_server_certificate_has_the_sans_and_chains_to_the_ca(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((certs / "superlink" / "server.crt").read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["coordinator.example.org", "localhost"]
    assert sorted(map(str, sans.get_values_for_type(x509.IPAddress))) == ["10.1.2.3", "127.0.0.1"]
    store = Store([ca])
    for name in (x509.DNSName("coordinator.example.org"), x509.IPAddress(ipaddress.ip_address("10.1.2.3"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):  # a name the certificate was not issued for
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example.org")).verify(leaf, [])
    other_ca = x509.load_pem_x509_certificate(_another_ca(certs.parent))
    with pytest.raises(VerificationError):  # a CA that did not issue it
        PolicyBuilder().store(Store([other_ca])).build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    # The server key is the certificate's key.
    key = serialization.load_pem_private_key((certs / "superlink" / "server.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key() and isinstance(key.curve, ec.SECP384R1)


def _another_ca(tmp_path) -> bytes:
    assert main(["certs", str(tmp_path / "other"), "--dns", "localhost"]) == 0
    return (tmp_path / "other" / "ca.crt").read_bytes()


def test_node_keys_are_p384_in_flowers_encoding(certs):
    for name in ("st-anna", "charite"):
        private = serialization.load_ssh_private_key((certs / "hospitals" / name / "node.key").read_bytes(), None)
        public = serialization.load_ssh_public_key((certs / "hospitals" / name / "node.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public
    a, b = ((certs / "hospitals" / n / "node.pub").read_bytes() for n in ("st-anna", "charite"))
    assert a.split()[1] != b.split()[1]  # one key pair per hospital


def test_private_files_are_owner_only(certs):
    for key in ("ca.key", "superlink/server.key", "hospitals/st-anna/node.key", "hospitals/charite/node.key"):
        assert mode(certs / key) == 0o600, key
    for folder in (".", "superlink", "hospitals", "hospitals/st-anna", "hospitals/charite"):
        assert mode(certs / folder) == 0o700, folder
    assert not mode(certs / "ca.crt") & 0o022  # public, but nobody else may replace it


def test_no_overwrite_without_force(certs, capsys):
    key = certs / "hospitals" / "charite" / "node.key"
    server_key = certs / "superlink" / "server.key"
    before = key.read_bytes(), server_key.read_bytes(), (certs / "ca.key").read_bytes()
    assert main(["certs", str(certs), "--hospital", "charite"]) == 2
    err = capsys.readouterr().err
    assert str(key) in err and "--force" in err
    assert main(["certs", str(certs), "--dns", "localhost"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (key.read_bytes(), server_key.read_bytes(), (certs / "ca.key").read_bytes()) == before
    # A new hospital is added with the existing CA; nothing else changes.
    assert main(["certs", str(certs), "--hospital", "ukt"]) == 0
    assert (certs / "hospitals" / "ukt" / "node.pub").is_file()
    assert (key.read_bytes(), server_key.read_bytes(), (certs / "ca.key").read_bytes()) == before
    # --force replaces exactly the keys asked for, and the new server certificate still chains to the same CA.
    assert main(["certs", str(certs), "--hospital", "charite", "--dns", "localhost", "--force"]) == 0
    assert key.read_bytes() != before[0] and server_key.read_bytes() != before[1]
    assert (certs / "ca.key").read_bytes() == before[2] and mode(key) == 0o600
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((certs / "superlink" / "server.crt").read_bytes())
    PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])


@pytest.mark.parametrize("args, message", [
    (["--dns", "bad name!"], "--dns: 'bad name!' is not a DNS name"),
    (["--ip", "300.1.1.1"], "--ip: '300.1.1.1' is not an IPv4 or IPv6 address"),
    (["--hospital", "../escape", "--ip", "127.0.0.1"], "--hospital: '../escape' is not a usable name"),
    ([], "needs at least one --dns NAME or --ip ADDRESS"),
])
def test_bad_arguments_name_the_flag(tmp_path, capsys, args, message):
    assert main(["certs", str(tmp_path / "c")] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c" / "ca.key").exists()  # nothing written on a refused call
