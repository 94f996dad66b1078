"""TLS for NBD: one certificate directory, read and checked once, at start.

ferry keeps the convention nbdkit, qemu-nbd and libnbd share, so one
directory serves all of them (``--tls-certificates DIR``,
``nbds://HOST/?tls-certificates=DIR``, ``tls-creds-x509,dir=DIR``)::

    ca-cert.pem       the CA that issues every peer's certificate    always
    server-cert.pem   this node's certificate as an NBD server        --tls on|require
    server-key.pem    its private key, unencrypted                    --tls on|require
    client-cert.pem   this node's certificate as an NBD client        optional, both or neither
    client-key.pem    its private key                                 (ferry mirror, read, write)

Every problem with the directory is found at start and reported as one
line per file (missing, unreadable, not PEM, an encrypted key, a key that
is not the certificate's, a certificate that is expired, not yet valid or
not issued by ``ca-cert.pem``), all at once, rather than as a failed
handshake with the first client.  A certificate file may hold a chain: the
first certificate is this node's, the rest intermediates up to the CA.

The defaults are the secure ones and are not configurable: TLS 1.2 or
later, no compression, Twisted's cipher list, no session tickets, and
peers verified against ``ca-cert.pem`` alone (never the system's trust
store).  A client checks that the server's certificate names the host it
dialled (a DNS name or an IP address in its subjectAltName);
``--tls-verify-peer`` makes a server require a client certificate from the
CA.  A verified client is known by its certificate's subject, as an RFC 4514
string (``CN=src1,O=ferry``: what ``openssl x509 -noout -subject -nameopt
RFC2253`` prints); ``--tls-allowed-subjects FILE`` lists those that may send
a migration (:func:`read_subjects`).

Twisted runs TLS in memory (pyOpenSSL): :class:`ServerTLS` holds what a
listener hands to ``transport.startTLS``; :meth:`Credentials.client_creator`
what ferry's migration source does; :meth:`Credentials.client_context` is
the standard library's version for the blocking ``ferry read``/``write``.
:class:`ClientTLS` is the client side alone, from files named one by one
(:func:`load_client_tls`): an etcd lockspace's ``cacert``, ``cert`` and ``key``.
"""

from __future__ import annotations

import datetime
import itertools
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import crypto
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from ferry.nbd.constants import TLSMode

__all__ = [
    "CA_CERT",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "ClientTLS",
    "Credentials",
    "ServerTLS",
    "TLSError",
    "TLSMode",
    "describe_error",
    "load_client_tls",
    "load_credentials",
    "peer_subject",
    "read_subjects",
]

CA_CERT: Final = "ca-cert.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"
CLIENT_CERT: Final = "client-cert.pem"
CLIENT_KEY: Final = "client-key.pem"

#: The oldest protocol either side accepts (the NBD spec: TLS 1.2 at least).
MINIMUM_VERSION: Final = twisted_ssl.TLSVersion.TLSv1_2
_MAX_PEM: Final = 1024 * 1024  # a certificate file past this is not one
_MAX_SUBJECTS_FILE: Final = 1024 * 1024


class TLSError(Exception):
    """What is wrong with the TLS settings: one line per problem (``problems``)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class KeyPair:
    """A certificate (first of ``chain``), the intermediates after it, and its private key."""

    chain: tuple[x509.Certificate, ...]
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True)
class Credentials:
    """A checked certificate directory: the CA, and this node's server and client pairs."""

    directory: str
    authorities: tuple[x509.Certificate, ...]
    server: KeyPair | None = None
    client: KeyPair | None = None

    def server_options(self, *, verify_peer: bool) -> twisted_ssl.CertificateOptions:
        """What ``startTLS`` needs on a server; with ``verify_peer``, a client certificate
        issued by the CA is required, and the CA is named in the certificate request."""
        if self.server is None:
            raise ValueError(f"{self.directory} has no server certificate")
        # pyOpenSSL wants cryptography's objects now (its own are deprecated);
        # Twisted's annotations still name the old ones.
        server: Any = self.server
        options = twisted_ssl.CertificateOptions(
            privateKey=server.key,
            certificate=server.certificate,
            extraCertChain=list(server.chain[1:]),
            verify=verify_peer,
            caCerts=self._openssl_authorities() if verify_peer else None,
            requireCertificate=verify_peer,
            raiseMinimumTo=MINIMUM_VERSION,
        )
        if verify_peer:
            # GnuTLS clients (libnbd, qemu) pick the certificate to send from
            # the CA names the server asks for.
            context = options.getContext()
            for authority in self.authorities:
                context.add_client_ca(authority)
        return options

    def client_creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """What ``startTLS`` needs on ferry's client: the server verified against the CA and
        ``host`` (a name or an IP address), this node's client certificate if it has one."""
        return ClientTLS(self.authorities, self.client).creator(host)

    def client_context(self) -> ssl.SSLContext:
        """The same client settings for a blocking socket (``ssl.SSLContext.wrap_socket``)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION
        pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.authorities)
        context.load_verify_locations(cadata=pem.decode("ascii"))
        if self.client is not None:
            context.load_cert_chain(
                os.path.join(self.directory, CLIENT_CERT), os.path.join(self.directory, CLIENT_KEY)
            )
        return context

    def _openssl_authorities(self) -> list[crypto.X509]:
        return _openssl(self.authorities)


@dataclass(frozen=True)
class ClientTLS:
    """A TLS client: the CAs it trusts (None: the system's store) and its own certificate."""

    authorities: tuple[x509.Certificate, ...] | None = None
    pair: KeyPair | None = None

    def creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """Settings for one connection to ``host`` (a name or an IP address), which the
        server's certificate must name."""
        extra: dict[str, Any] = {"raiseMinimumTo": MINIMUM_VERSION}
        if self.pair is not None:
            extra.update(
                privateKey=self.pair.key,
                certificate=self.pair.certificate,
                extraCertChain=list(self.pair.chain[1:]),
            )
        roots: Any = None  # Twisted's default: the platform's trust store
        if self.authorities is not None:
            roots = twisted_ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
                [
                    twisted_ssl.Certificate(cert)  # type: ignore[no-untyped-call]
                    for cert in _openssl(self.authorities)
                ]
            )
        creator: IOpenSSLClientConnectionCreator = twisted_ssl.optionsForClientTLS(
            host.strip("[]"), trustRoot=roots, extraCertificateOptions=extra
        )
        return creator


def _openssl(certificates: Sequence[x509.Certificate]) -> list[crypto.X509]:
    # Twisted's trust roots add pyOpenSSL objects to the context's store.
    return [crypto.X509.from_cryptography(cert) for cert in certificates]


@dataclass(frozen=True)
class ServerTLS:
    """A listener's TLS: ``--tls``, its certificates, ``--tls-verify-peer`` and
    ``--tls-allowed-subjects`` (None: every verified subject may send a migration)."""

    mode: TLSMode
    options: twisted_ssl.CertificateOptions | None = None
    verify_peer: bool = False
    allowed_senders: frozenset[x509.Name] | None = None

    def __post_init__(self) -> None:
        if self.mode is not TLSMode.OFF and self.options is None:
            raise ValueError(f"--tls {self.mode.value} needs certificates")

    @property
    def authenticates_senders(self) -> bool:
        """Every migration sender is known by a certificate: TLS required, and verified."""
        return self.mode is TLSMode.REQUIRE and self.verify_peer

    def sender_refusal(self, subject: x509.Name | None) -> str | None:
        """Why a sender whose verified certificate names ``subject`` may not send (None: it may).

        ``subject`` is None for a peer without a verified certificate: it is
        left to the ACL, unless ``--tls-allowed-subjects`` is given, which
        admits only the certificates it lists.
        """
        if subject is None:
            if self.allowed_senders is not None:
                return "only a sender with a certificate listed in --tls-allowed-subjects may send"
            return None
        if self.allowed_senders is not None and subject not in self.allowed_senders:
            return f"certificate subject {subject.rfc4514_string()} is not an allowed sender"
        return None


def load_credentials(
    directory: str | os.PathLike[str], *, server: bool, client: bool = True
) -> Credentials:
    """Read and check ``directory``; :class:`TLSError` lists every problem found.

    ``server``: the server pair is required.  ``client``: the client pair is
    read if present (both files, or neither).
    """
    where = os.fspath(directory)
    if not os.path.isdir(where):
        reason = "does not exist" if not os.path.exists(where) else "is not a directory"
        raise TLSError([f"--tls-certificates {where} {reason}"])
    def at(name: str) -> str:
        return os.path.join(where, name)

    problems: list[str] = []
    now = datetime.datetime.now(datetime.UTC)
    authorities = _authorities(at(CA_CERT), now, problems)
    server_pair = None
    if server:
        server_pair = _key_pair(at(SERVER_CERT), at(SERVER_KEY), authorities, now, problems)
    client_pair = None
    if client:
        present = [os.path.exists(at(name)) for name in (CLIENT_CERT, CLIENT_KEY)]
        if all(present):
            client_pair = _key_pair(at(CLIENT_CERT), at(CLIENT_KEY), authorities, now, problems)
        elif any(present):
            have, missing = (CLIENT_CERT, CLIENT_KEY) if present[0] else (CLIENT_KEY, CLIENT_CERT)
            problems.append(f"{at(missing)}: missing ({have} needs it)")
    if problems:
        raise TLSError(problems)
    return Credentials(where, tuple(authorities), server_pair, client_pair)


def load_client_tls(
    cacert: str | None = None, cert: str | None = None, key: str | None = None
) -> ClientTLS:
    """A TLS client from files named one by one; :class:`TLSError` lists every problem.

    Without ``cacert`` the system's trust store decides; ``cert`` and
    ``key`` come together or not at all.
    """
    if (cert is None) != (key is None):
        raise TLSError(["a client certificate and its key come together: give both or neither"])
    problems: list[str] = []
    now = datetime.datetime.now(datetime.UTC)
    authorities = None if cacert is None else tuple(_authorities(cacert, now, problems))
    pair = None
    if cert is not None and key is not None:
        pair = _key_pair(cert, key, authorities or (), now, problems, cacert or "")
    if problems:
        raise TLSError(problems)
    return ClientTLS(authorities, pair)


def read_subjects(path: str | os.PathLike[str]) -> frozenset[x509.Name]:
    """The subjects of ``--tls-allowed-subjects``: one RFC 4514 name a line.

    Blank lines and lines starting with ``#`` are skipped; a line that is
    not a name is a :class:`TLSError` naming it (every bad line, at once).
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as file:
            raw = file.read(_MAX_SUBJECTS_FILE + 1)
    except OSError as error:
        raise TLSError([f"--tls-allowed-subjects {where}: {error.strerror}"]) from None
    if len(raw) > _MAX_SUBJECTS_FILE:
        raise TLSError([f"--tls-allowed-subjects {where}: over {_MAX_SUBJECTS_FILE} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TLSError([f"--tls-allowed-subjects {where}: not UTF-8 text"]) from None
    subjects: set[x509.Name] = set()
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            subjects.add(x509.Name.from_rfc4514_string(line))
        except ValueError as error:
            problems.append(f"{where}:{number}: not a subject ({error}): {line!r}")
    if problems:
        raise TLSError(problems)
    if not subjects:
        raise TLSError([f"--tls-allowed-subjects {where} lists no subject: no sender could send"])
    return frozenset(subjects)


def describe_error(error: BaseException) -> str:
    """One line for a TLS failure: OpenSSL's errors come as a list of (library, function,
    reason) tuples, of which the reasons are what a person needs."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        items = args[0]
        return "; ".join(str(i[-1]) if isinstance(i, tuple) else str(i) for i in items)
    return str(error) or type(error).__name__


def peer_subject(transport: Any) -> x509.Name | None:
    """The subject of the certificate a TLS peer presented (None: none, or not TLS)."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    certificate = get()
    if certificate is None:
        return None
    subject: x509.Name = certificate.to_cryptography().subject
    return subject


# -- reading the files -------------------------------------------------------------


def _read(path: str, problems: list[str]) -> bytes | None:
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_PEM + 1)
    except FileNotFoundError:
        problems.append(f"{path}: missing")
        return None
    except OSError as error:
        problems.append(f"{path}: cannot read it: {error.strerror}")
        return None
    if len(data) > _MAX_PEM:
        problems.append(f"{path}: over {_MAX_PEM} bytes: not a PEM file")
        return None
    return data


def _certificates(path: str, problems: list[str]) -> list[x509.Certificate]:
    data = _read(path, problems)
    if data is None:
        return []
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        problems.append(f"{path}: holds no PEM certificate")
    return found


def _authorities(
    path: str, now: datetime.datetime, problems: list[str]
) -> list[x509.Certificate]:
    authorities = _certificates(path, problems)
    for authority in authorities:
        _check_validity(path, authority, now, problems)
    return authorities


def _private_key(path: str, problems: list[str]) -> Any:
    data = _read(path, problems)
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(f"{path}: the key is encrypted; ferry needs it unencrypted (mode 0600)")
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{path}: holds no PEM private key")
    return None


def _key_pair(
    cert_path: str,
    key_path: str,
    authorities: Sequence[x509.Certificate],
    now: datetime.datetime,
    problems: list[str],
    ca: str = CA_CERT,
) -> KeyPair | None:
    before = len(problems)
    chain = _certificates(cert_path, problems)
    key = _private_key(key_path, problems)
    if chain:
        _check_validity(cert_path, chain[0], now, problems)
        _check_issuer(cert_path, chain, authorities, problems, ca)
    if chain and key is not None and not _same_public_key(chain[0], key):
        problems.append(f"{key_path}: not the key of {cert_path} (the public keys differ)")
    if len(problems) > before or not chain or key is None:
        return None
    return KeyPair(tuple(chain), key)


def _check_validity(
    path: str, certificate: x509.Certificate, now: datetime.datetime, problems: list[str]
) -> None:
    if now > certificate.not_valid_after_utc:
        problems.append(f"{path}: expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    elif now < certificate.not_valid_before_utc:
        problems.append(
            f"{path}: not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def _check_issuer(
    path: str,
    chain: Sequence[x509.Certificate],
    authorities: Sequence[x509.Certificate],
    problems: list[str],
    ca: str,
) -> None:
    """The chain leads from the certificate to one of ``ca``'s, link by link."""
    if not authorities:
        return  # no CA to check against (or its own problem is reported already)
    for child, parent in itertools.pairwise(chain):
        if not _issued_by(child, parent):
            problems.append(f"{path}: its chain is broken at {child.subject.rfc4514_string()}")
            return
    top = chain[-1]
    if not any(_issued_by(top, authority) or top == authority for authority in authorities):
        problems.append(
            f"{path}: not issued by {ca} (issuer {top.issuer.rfc4514_string()})"
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_public_key(certificate: x509.Certificate, key: Any) -> bool:
    form = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, form)
    theirs = certificate.public_key().public_bytes(serialization.Encoding.DER, form)
    return bool(ours == theirs)
