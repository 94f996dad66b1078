"""Certificates for the TLS tests, made fresh for each test module: no key is ever committed.

Each directory follows the convention ferry, nbdkit, qemu and libnbd share
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``,
``client-key.pem``), so one directory serves ``ferry serve --tls-certificates``,
``nbds://...?tls-certificates=DIR`` and ``tls-creds-x509,dir=DIR`` alike.
The certificates carry the extensions GnuTLS and qemu check (CA basic
constraints and key usage; server and client key purposes), and the server
certificate names ``localhost``, ``127.0.0.1`` and ``::1``.

Made with the ``cryptography`` package (P-256 keys: fast to make), keys
written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey
_DAY = datetime.timedelta(days=1)


def _name(common_name: str | None, organisation: str = "ferry tests") -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Authority:
    """A CA that issues the certificates of one test PKI."""

    name: x509.Name
    key: Key
    certificate: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> Authority:
        key = _key()
        name = _name(common_name)
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, certificate)

    def issue(
        self,
        common_name: str | None,
        *,
        server: bool,
        not_after: datetime.datetime | None = None,
        san: bool = True,
        also_client: bool = False,
    ) -> tuple[x509.Certificate, Key]:
        """A server certificate (for localhost, 127.0.0.1, ::1 unless not ``san``; a
        client's too with ``also_client``, as etcd's gateway wants) or a client one,
        and its key."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        purposes = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if also_client or not server:
            purposes.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - 2 * _DAY)
            .not_valid_after(not_after or now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server and san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()), key


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def write_key(path: Path, key: Key) -> None:
    raw = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(raw)


def certificate_directory(
    path: Path,
    trusted: Authority,
    *,
    server: tuple[x509.Certificate, Key] | None = None,
    client: tuple[x509.Certificate, Key] | None = None,
) -> Path:
    """A directory in the shared layout: ``trusted``'s certificate, and the pairs given."""
    path.mkdir(mode=0o700, parents=True)
    write_certificate(path / "ca-cert.pem", trusted.certificate)
    for pair, stem in ((server, "server"), (client, "client")):
        if pair is not None:
            write_certificate(path / f"{stem}-cert.pem", pair[0])
            write_key(path / f"{stem}-key.pem", pair[1])
    return path


@dataclass(frozen=True)
class PKI:
    """The test module's certificates, as directories.

    * ``node``: ferry's own (server and client pairs; client ``CN=source``).
    * ``other_node``: a second client of the same CA (``CN=intruder``).
    * ``ca_only``: the CA and no pair of its own (a client without a certificate).
    * ``rogue``: trusts the real CA (so it accepts ferry's server) but presents
      a client certificate from another CA.
    * ``stranger``: another CA's directory from top to bottom.
    """

    authority: Authority
    node: Path
    other_node: Path
    ca_only: Path
    rogue: Path
    stranger: Path

    @property
    def node_subject(self) -> str:
        return "CN=source,O=ferry tests"

    @property
    def other_subject(self) -> str:
        return "CN=intruder,O=ferry tests"


def make_pki(root: Path) -> PKI:
    authority = Authority.create("ferry test CA")
    other = Authority.create("someone else's CA")
    server = authority.issue("localhost", server=True)
    node = certificate_directory(
        root / "node", authority, server=server, client=authority.issue("source", server=False)
    )
    other_node = certificate_directory(
        root / "other-node",
        authority,
        server=server,
        client=authority.issue("intruder", server=False),
    )
    ca_only = certificate_directory(root / "ca-only", authority)
    rogue = certificate_directory(
        root / "rogue", authority, client=other.issue("source", server=False)
    )
    stranger = certificate_directory(
        root / "stranger",
        other,
        server=other.issue("localhost", server=True),
        client=other.issue("source", server=False),
    )
    return PKI(authority, node, other_node, ca_only, rogue, stranger)


def copy_directory(source: Path, target: Path) -> Path:
    """A copy of a certificate directory to break in one test."""
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module", name="pki")
def pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))
