"""Who may send a migration when TLS can vouch for the sender: the listener's rules, unit by unit.

The connection knows a peer by its certificate once the TLS layer says so
(``handshakeCompleted``, when the transport's ``getPeerCertificate`` has
one).  These tests play the TLS layer's part with the test CA's real
certificates and ask the listener at FERRY_OPT_MIGRATE; the real handshake
is ``tests/integration/test_tls_migration.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import crypto
from twisted.internet import task
from twisted.internet.ssl import CertificateOptions

from ferry.nbd.constants import OptionReply, TLSMode
from ferry.nbd.events import Refusal
from ferry.node import Node, NodeConfig, StartupError
from ferry.serve.acl import Acl
from ferry.serve.server import NBDServer
from ferry.tls import ServerTLS, load_credentials
from tls_support import PKI, make_pki

from .test_listen_sender import Listener, Peer

SOURCE = x509.Name.from_rfc4514_string("CN=source,O=ferry tests")
INTRUDER = x509.Name.from_rfc4514_string("CN=intruder,O=ferry tests")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def options(pki: PKI) -> CertificateOptions:
    return load_credentials(pki.node, server=True).server_options(verify_peer=True)


@pytest.fixture(scope="module")
def certificates(pki: PKI) -> dict[x509.Name, crypto.X509]:
    """The client certificates the test CA issued, by subject (as the TLS layer hands them)."""
    found = {}
    for directory in (pki.node, pki.other_node):
        certificate = x509.load_pem_x509_certificate((directory / "client-cert.pem").read_bytes())
        found[certificate.subject] = crypto.X509.from_cryptography(certificate)
    assert set(found) == {SOURCE, INTRUDER}
    return found


def tls_listener(
    tmp_path: Path, options: CertificateOptions, allowed: frozenset[x509.Name] | None = None
) -> Listener:
    listener = Listener(tmp_path)
    # --tls on: a sender may negotiate in the clear here, so that the test can
    # play the TLS layer's part and hand the connection a certificate.
    listener.server.tls = ServerTLS(TLSMode.ON, options, verify_peer=True, allowed_senders=allowed)
    return listener


def sender_known_as(listener: Listener, certificate: crypto.X509 | None, host: str) -> Peer:
    """A sender at ``host`` whose TLS handshake showed ``certificate`` (None: none)."""
    peer = listener.sender(host=host)
    peer.transport.getPeerCertificate = lambda: certificate  # type: ignore[attr-defined]
    peer.protocol.handshakeCompleted()  # before any option: TLS comes first
    assert peer.protocol.tls_subject == (
        None if certificate is None else certificate.to_cryptography().subject
    )
    return peer


def test_a_sender_verified_by_its_certificate_needs_no_acl_entry(
    tmp_path: Path, options: CertificateOptions, certificates: dict[x509.Name, crypto.X509]
) -> None:
    listener = tls_listener(tmp_path, options)
    peer = sender_known_as(listener, certificates[SOURCE], "192.0.2.7")  # off loopback, empty ACL
    assert peer.answer().reply == OptionReply.ACK
    peer.pump()
    assert listener.export.state == "receiving"


def test_a_listed_subject_is_admitted_and_any_other_refused(
    tmp_path: Path, options: CertificateOptions, certificates: dict[x509.Name, crypto.X509]
) -> None:
    listener = tls_listener(tmp_path, options, frozenset({SOURCE}))
    intruder = sender_known_as(listener, certificates[INTRUDER], "127.0.0.1")
    answer = intruder.answer()
    assert answer.reply == OptionReply.ERR_POLICY
    assert answer.message == (
        "certificate subject CN=intruder,O=ferry tests is not an allowed sender"
    )
    assert listener.export.state == "listening"
    source = sender_known_as(listener, certificates[SOURCE], "192.0.2.7")
    assert source.answer().reply == OptionReply.ACK


def test_with_a_subject_list_the_acl_alone_admits_no_sender(
    tmp_path: Path, options: CertificateOptions
) -> None:
    listener = tls_listener(tmp_path, options, frozenset({SOURCE}))
    listener.server.acl = Acl.parse(["127.0.0.0/8"])
    plain = sender_known_as(listener, None, "127.0.0.1")  # named by the ACL, no certificate
    answer = plain.answer()
    assert answer.reply == OptionReply.ERR_POLICY
    assert "listed in --tls-allowed-subjects" in answer.message
    assert listener.export.state == "listening"


def test_without_a_certificate_the_acl_decides_as_before(
    tmp_path: Path, options: CertificateOptions
) -> None:
    listener = tls_listener(tmp_path, options)
    far = sender_known_as(listener, None, "192.0.2.7")
    assert far.answer().message == (
        "192.0.2.7 may not send a migration here: its ACL does not name it"
    )
    assert sender_known_as(listener, None, "127.0.0.1").answer().reply == OptionReply.ACK


def test_a_verified_sender_still_needs_the_export_s_acl_to_let_it_in(
    tmp_path: Path, options: CertificateOptions, certificates: dict[x509.Name, crypto.X509]
) -> None:
    """The certificate stands in for an ACL naming the sender, not for an ACL refusing it."""
    listener = tls_listener(tmp_path, options)
    listener.export.acl = Acl.parse(["198.51.100.0/24"])
    answer = sender_known_as(listener, certificates[SOURCE], "192.0.2.7").answer()
    assert (answer.reply, answer.message) == (
        OptionReply.ERR_POLICY,
        "export 'disk' does not admit 192.0.2.7",
    )
    assert listener.export.state == "listening"


def test_a_node_that_requires_tls_takes_no_moved_connections(
    tmp_path: Path, options: CertificateOptions
) -> None:
    """FERRY_OPT_CONNECTIONS: a connection that moves is never TLS, so a node that
    requires TLS refuses them, even from a sender its certificate admits."""
    listener = tls_listener(tmp_path, options)
    listener.server.tls = ServerTLS(TLSMode.REQUIRE, options, verify_peer=True)
    landing = listener.server.catalog_for("127.0.0.1", SOURCE).connection_landing()
    assert landing == Refusal(
        OptionReply.ERR_POLICY,
        "this node requires TLS, and a client connection that moves is never TLS",
    )
    # Under --tls on it is up to the node's receiver (this one takes none).
    listener.server.tls = ServerTLS(TLSMode.ON, options, verify_peer=True)
    landing = listener.server.catalog_for("127.0.0.1", SOURCE).connection_landing()
    assert isinstance(landing, Refusal) and landing.error == OptionReply.ERR_UNSUP


def listen_node(addr: str, tls: ServerTLS, *, daemon: bool = False) -> Node:
    """A node as far as the check of a listening export's senders needs."""
    node = Node(task.Clock(), NodeConfig(addr=addr, exit_stops_node=not daemon))
    node.server = NBDServer([], clock=node.clock, run_blocking=node.run_blocking, tls=tls)
    return node


def test_a_listener_off_loopback_starts_without_an_acl_only_with_verified_peers(
    options: CertificateOptions,
) -> None:
    verified = ServerTLS(TLSMode.REQUIRE, options, verify_peer=True)
    listen_node("0.0.0.0", verified)._check_senders_are_named(Acl())
    unverified = ServerTLS(TLSMode.REQUIRE, options, verify_peer=False)
    with pytest.raises(StartupError, match=r"\(--tls require --tls-verify-peer\)$"):
        listen_node("0.0.0.0", unverified)._check_senders_are_named(Acl())
    with pytest.raises(StartupError, match="name the source hosts as ACL entries"):
        listen_node("0.0.0.0", ServerTLS(TLSMode.OFF))._check_senders_are_named(Acl())
    # A daemon's export says it in the file's words.
    with pytest.raises(StartupError, match=r'\(tls = "require" and tls_verify_peer = true\)$'):
        listen_node("0.0.0.0", unverified, daemon=True)._check_senders_are_named(Acl())
