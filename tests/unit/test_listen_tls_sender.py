"""Who may send a migration when TLS can vouch for the sender: the listener's rules, unit by unit.

The connection knows a peer by its certificate once the TLS layer says so
(``handshakeCompleted``: ``tls_subject``).  These tests set that subject as
the TLS layer would and ask the listener at FERRY_OPT_MIGRATE; the real
handshake, with real certificates, is ``tests/integration/test_tls_migration.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from twisted.internet.ssl import CertificateOptions

from ferry.nbd.constants import OptionReply, TLSMode
from ferry.node import ServeConfig, StartupError, _check_senders_are_named
from ferry.serve.acl import Acl
from ferry.tls import ServerTLS, load_credentials
from tls_support import make_pki

from .test_listen_sender import Listener, Peer

SOURCE = x509.Name.from_rfc4514_string("CN=source,O=ferry tests")
INTRUDER = x509.Name.from_rfc4514_string("CN=intruder,O=ferry tests")


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> CertificateOptions:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    return load_credentials(pki.node, server=True).server_options(verify_peer=True)


def tls_listener(
    tmp_path: Path, options: CertificateOptions, allowed: frozenset[x509.Name] | None = None
) -> Listener:
    listener = Listener(tmp_path)
    # --tls on: a sender may negotiate in the clear here, so that the test can
    # play the TLS layer's part and set the subject by hand.
    listener.server.tls = ServerTLS(
        TLSMode.ON, options, verify_peer=True, allowed_senders=allowed
    )
    return listener


def sender_known_as(listener: Listener, subject: x509.Name | None, host: str) -> Peer:
    peer = listener.sender(host=host)
    peer.protocol.tls_subject = subject
    return peer


def test_a_sender_verified_by_its_certificate_needs_no_acl_entry(
    tmp_path: Path, options: CertificateOptions
) -> None:
    listener = tls_listener(tmp_path, options)
    peer = sender_known_as(listener, SOURCE, "192.0.2.7")  # off loopback, empty ACL
    assert peer.answer().reply == OptionReply.ACK
    peer.pump()
    assert listener.export.state == "receiving"


def test_a_listed_subject_is_admitted_and_any_other_refused(
    tmp_path: Path, options: CertificateOptions
) -> None:
    listener = tls_listener(tmp_path, options, frozenset({SOURCE}))
    intruder = sender_known_as(listener, INTRUDER, "127.0.0.1")
    answer = intruder.answer()
    assert answer.reply == OptionReply.ERR_POLICY
    assert answer.message == (
        "certificate subject CN=intruder,O=ferry tests is not an allowed sender"
    )
    assert listener.export.state == "listening"
    assert sender_known_as(listener, SOURCE, "192.0.2.7").answer().reply == OptionReply.ACK


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


def listen_config(addr: str) -> ServeConfig:
    return ServeConfig(file="disk.img", addr=addr, listen=True)


def test_a_listener_off_loopback_starts_without_an_acl_only_with_verified_peers(
    options: CertificateOptions,
) -> None:
    verified = ServerTLS(TLSMode.REQUIRE, options, verify_peer=True)
    _check_senders_are_named(listen_config("0.0.0.0"), Acl(), verified)
    unverified = ServerTLS(TLSMode.REQUIRE, options, verify_peer=False)
    with pytest.raises(StartupError, match="--tls require --tls-verify-peer"):
        _check_senders_are_named(listen_config("0.0.0.0"), Acl(), unverified)
    with pytest.raises(StartupError, match="name the source hosts"):
        _check_senders_are_named(listen_config("0.0.0.0"), Acl(), ServerTLS(TLSMode.OFF))
