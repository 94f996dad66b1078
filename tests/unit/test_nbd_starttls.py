"""NBD_OPT_STARTTLS in the sans-IO server and client: the spec's three modes, byte for byte.

No TLS happens here: the parsers only say when the caller must start it
(``StartTLS``) and learn that it did (``tls_started``).  The integration
tests (``tests/integration/test_tls.py``) run real TLS with real peers.
"""

from __future__ import annotations

import struct

import pytest

from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import OptionReply, TLSMode
from ferry.nbd.events import (
    HandshakeAborted,
    HandshakeComplete,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    ProtocolError,
    StartTLS,
)
from ferry.nbd.server import ServerConnection

from . import nbd_frames as f
from .test_nbd_server import (
    OPT_MIGRATE,
    SIZE,
    WRITABLE_FLAGS,
    Catalog,
    Listener,
    migrate_data,
    negotiate,
    rep,
    replies,
)


def server(tls: TLSMode, catalog: Catalog | None = None) -> ServerConnection:
    catalog = catalog or Catalog()
    migration = catalog if isinstance(catalog, Listener) else None
    conn = ServerConnection(catalog, migration=migration, tls=tls)  # type: ignore[arg-type]
    assert conn.data_to_send() == f.newstyle_greeting()
    return conn


def upgraded(tls: TLSMode = TLSMode.REQUIRE, catalog: Catalog | None = None) -> ServerConnection:
    """A connection whose STARTTLS was acknowledged and whose caller started TLS."""
    conn = server(tls, catalog)
    assert negotiate(conn, f.option(f.OPT_STARTTLS)) == [StartTLS()]
    assert replies(conn) == [rep(f.OPT_STARTTLS, f.REP_ACK)]
    conn.tls_started()
    assert conn.tls
    return conn


# -- --tls off: NOTLS ---------------------------------------------------------------------------


def test_off_refuses_starttls_by_policy_and_negotiation_goes_on() -> None:
    conn = server(TLSMode.OFF)
    events = negotiate(conn, f.option(f.OPT_STARTTLS), f.option(f.OPT_GO, f.info_data("disk")))
    out = replies(conn)
    assert (out[0].option, out[0].type) == (f.OPT_STARTTLS, f.REP_ERR_POLICY)
    assert b"TLS is off" in out[0].data
    assert [type(e) for e in events] == [HandshakeComplete]
    assert not conn.tls


@pytest.mark.parametrize("mode", list(TLSMode))
def test_starttls_with_data_is_invalid_in_every_mode(mode: TLSMode) -> None:
    conn = server(mode)
    assert negotiate(conn, f.option(f.OPT_STARTTLS, b"x")) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (f.OPT_STARTTLS, f.REP_ERR_INVALID)
    assert not conn.tls and not conn.closed


# -- --tls require: FORCEDTLS ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "data"),
    [
        (f.OPT_LIST, b""),
        (f.OPT_INFO, f.info_data("disk")),
        (f.OPT_GO, f.info_data("disk")),
        (f.OPT_STRUCTURED_REPLY, b""),
        (f.OPT_LIST_META_CONTEXT, f.meta_data("disk")),
        (f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation")),
        (f.OPT_EXTENDED_HEADERS, b""),
        (OPT_MIGRATE, migrate_data()),
        (999, b"whatever"),
    ],
    ids=["list", "info", "go", "structured", "list-meta", "set-meta", "ext", "migrate", "999"],
)
def test_require_answers_every_option_before_tls_with_tls_reqd(option: int, data: bytes) -> None:
    conn = server(TLSMode.REQUIRE, Listener())
    assert negotiate(conn, f.option(option, data)) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (option, f.REP_ERR_TLS_REQD)
    assert b"STARTTLS" in reply.data  # says what to do
    assert not conn.closed and not conn.handshake_done
    # ... and the connection goes on: the client may still upgrade.
    assert conn.receive_data(f.option(f.OPT_STARTTLS)) == [StartTLS()]


def test_require_closes_on_export_name_before_tls_which_cannot_be_refused() -> None:
    conn = server(TLSMode.REQUIRE)
    [event] = negotiate(conn, f.option(f.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeAborted) and "TLS is required" in event.reason
    assert conn.data_to_send() == b""  # no size, no flags, no export
    assert conn.closed and conn.export is None


def test_require_lets_abort_through_before_tls() -> None:
    conn = server(TLSMode.REQUIRE)
    [event] = negotiate(conn, f.option(f.OPT_ABORT))
    assert isinstance(event, HandshakeAborted)
    assert replies(conn) == [rep(f.OPT_ABORT, f.REP_ACK)]


def test_require_after_tls_answers_as_usual() -> None:
    conn = upgraded()
    events = conn.receive_data(
        f.option(f.OPT_LIST) + f.option(f.OPT_GO, f.info_data("disk", f.INFO_BLOCK_SIZE))
    )
    out = replies(conn)
    assert rep(f.OPT_LIST, f.REP_ACK) in out
    assert out[-1] == rep(f.OPT_GO, f.REP_ACK)
    assert all(r.type != f.REP_ERR_TLS_REQD for r in out)
    [done] = events
    assert isinstance(done, HandshakeComplete) and done.export.name == "disk"


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_a_second_starttls_is_invalid(mode: TLSMode) -> None:
    conn = upgraded(mode)
    assert conn.receive_data(f.option(f.OPT_STARTTLS)) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (f.OPT_STARTTLS, f.REP_ERR_INVALID)
    assert b"already" in reply.data
    assert conn.tls and not conn.closed


def test_export_name_after_tls_enters_transmission() -> None:
    conn = upgraded()
    [event] = conn.receive_data(f.option(f.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeComplete)
    assert conn.data_to_send()[:10] == SIZE.to_bytes(8, "big") + WRITABLE_FLAGS.to_bytes(2, "big")


# -- --tls on: SELECTIVETLS, no TLS-only export ---------------------------------------------------


def test_on_serves_a_client_that_never_upgrades() -> None:
    conn = server(TLSMode.ON)
    [event] = negotiate(conn, f.option(f.OPT_GO, f.info_data("disk")))
    assert isinstance(event, HandshakeComplete)
    assert not conn.tls


def test_on_upgrades_a_client_that_asks() -> None:
    conn = upgraded(TLSMode.ON)
    [event] = conn.receive_data(f.option(f.OPT_GO, f.info_data("disk")))
    assert isinstance(event, HandshakeComplete)


# -- the upgrade itself ---------------------------------------------------------------------------


def test_plaintext_after_starttls_in_the_same_chunk_breaks_the_connection() -> None:
    conn = server(TLSMode.REQUIRE)
    with pytest.raises(ProtocolError, match="in the clear after NBD_OPT_STARTTLS"):
        negotiate(conn, f.option(f.OPT_STARTTLS), f.option(f.OPT_GO, f.info_data("disk")))
    assert conn.closed
    # The ACK is queued (the caller may flush it before closing); nothing follows it.
    assert replies(conn) == [rep(f.OPT_STARTTLS, f.REP_ACK)]


def test_plaintext_after_starttls_before_tls_started_breaks_the_connection() -> None:
    conn = server(TLSMode.ON)
    assert negotiate(conn, f.option(f.OPT_STARTTLS)) == [StartTLS()]
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x16")  # a ClientHello's first byte is still not allowed
    with pytest.raises(RuntimeError):
        conn.tls_started()  # broken: no upgrade is pending any more


def test_starttls_split_at_every_byte_still_upgrades() -> None:
    conn = server(TLSMode.REQUIRE)
    stream = f.client_flags() + f.option(f.OPT_STARTTLS)
    events = [event for byte in stream for event in conn.receive_data(bytes([byte]))]
    assert events == [StartTLS()]
    conn.tls_started()
    [event] = conn.receive_data(f.option(f.OPT_GO, f.info_data("disk")))
    assert isinstance(event, HandshakeComplete)


def test_the_upgrade_forgets_what_was_negotiated_in_the_clear() -> None:
    conn = server(TLSMode.ON)
    negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation")),
        f.option(f.OPT_STARTTLS),
    )
    conn.data_to_send()
    conn.tls_started()
    [event] = conn.receive_data(f.option(f.OPT_GO, f.info_data("disk")))
    assert isinstance(event, HandshakeComplete)
    assert not event.structured_replies and event.meta_contexts == {}


def test_the_upgrade_forgets_a_migration_sender_acknowledged_in_the_clear() -> None:
    listener = Listener()
    conn = server(TLSMode.ON, listener)
    negotiate(conn, f.option(OPT_MIGRATE, migrate_data()), f.option(f.OPT_STARTTLS))
    assert [r.type for r in replies(conn)] == [f.REP_ACK, f.REP_ACK]
    conn.tls_started()
    assert conn.migration is None
    # Without a new FERRY_OPT_MIGRATE it is an ordinary client, refused by the listener.
    assert conn.receive_data(f.option(f.OPT_GO, f.info_data("disk"))) == []
    [reply] = replies(conn)
    assert reply.type == f.REP_ERR_POLICY


def test_tls_started_without_an_upgrade_pending_is_a_caller_bug() -> None:
    conn = server(TLSMode.REQUIRE)
    with pytest.raises(RuntimeError):
        conn.tls_started()


def test_oldstyle_cannot_use_tls() -> None:
    with pytest.raises(ValueError, match="oldstyle"):
        ServerConnection(Catalog(), oldstyle=True, tls=TLSMode.ON)  # type: ignore[arg-type]


# -- the client: TLS first, or nothing ------------------------------------------------------------

# The server's ACK to NBD_OPT_STARTTLS (5): magic, option, reply type 1, no data.
STARTTLS_ACK = struct.pack(">QIII", f.OPTION_REPLY_MAGIC, 5, 1, 0)


def exchange(client: ClientConnection, conn: ServerConnection) -> list[object]:
    """Move bytes both ways until neither side has any; every event, starting TLS when told."""
    events: list[object] = []
    while True:
        to_server = client.data_to_send()
        to_client = conn.data_to_send()
        if not to_server and not to_client:
            return events
        if to_server:
            for event in conn.receive_data(to_server):
                events.append(event)
                if isinstance(event, StartTLS):
                    conn.tls_started()
        if to_client:
            for event in client.receive_data(to_client):
                events.append(event)
                if isinstance(event, StartTLS):
                    client.tls_started()


def test_client_asks_for_tls_before_any_other_option() -> None:
    client = ClientConnection("disk", tls=True, extra_options=[(OPT_MIGRATE, migrate_data())])
    assert client.receive_data(f.newstyle_greeting()) == []
    assert client.data_to_send() == f.client_flags() + f.option(f.OPT_STARTTLS)
    assert client.receive_data(STARTTLS_ACK) == [StartTLS()]
    assert client.data_to_send() == b""  # nothing more in the clear
    client.tls_started()
    assert client.tls
    assert client.data_to_send() == f.option(OPT_MIGRATE, migrate_data())


def test_client_against_a_tls_server_negotiates_after_the_upgrade() -> None:
    listener = Listener()
    conn = server(TLSMode.REQUIRE, listener)
    client = ClientConnection("disk", tls=True, extra_options=[(OPT_MIGRATE, migrate_data())])
    events = exchange(client, _greeted(client, conn))
    kinds = [type(e) for e in events]
    assert kinds.count(StartTLS) == 2  # one on each side
    assert OptionAnswered(OPT_MIGRATE, OptionReply.ACK) in events
    [done] = [e for e in events if isinstance(e, HandshakeComplete)]
    assert done.migration is not None  # the sender, acknowledged under TLS
    assert any(isinstance(e, Negotiated) for e in events)
    assert conn.tls and client.tls


def test_a_plain_client_under_require_is_told_tls_is_required() -> None:
    conn = server(TLSMode.REQUIRE)
    client = ClientConnection("disk")
    events = exchange(client, _greeted(client, conn))
    [failed] = [e for e in events if isinstance(e, NegotiationFailed)]
    assert failed.error is OptionReply.ERR_TLS_REQD
    assert "STARTTLS" in failed.message
    assert not any(isinstance(e, HandshakeComplete) for e in events)


def test_client_that_needs_tls_gives_up_on_a_server_without_it() -> None:
    conn = server(TLSMode.OFF)
    client = ClientConnection("disk", tls=True)
    events = exchange(client, _greeted(client, conn))
    [failed] = [e for e in events if isinstance(e, NegotiationFailed)]
    assert failed.error is OptionReply.ERR_POLICY
    assert "refused TLS" in failed.message and "TLS is off" in failed.message
    # It said goodbye (ABORT) and the server saw the session end, not a GO.
    assert any(isinstance(e, HandshakeAborted) for e in events)
    assert not client.tls and not conn.tls


def test_client_that_needs_tls_refuses_an_oldstyle_server() -> None:
    client = ClientConnection("", tls=True)
    [failed] = client.receive_data(f.oldstyle_greeting(SIZE, 1))
    assert isinstance(failed, NegotiationFailed) and "oldstyle" in failed.message
    assert client.data_to_send() == b""


def test_client_breaks_on_plaintext_after_the_starttls_ack() -> None:
    client = ClientConnection("disk", tls=True)
    client.receive_data(f.newstyle_greeting())
    client.data_to_send()
    with pytest.raises(ProtocolError, match="in the clear"):
        client.receive_data(STARTTLS_ACK + b"\x16\x03\x03")


def _greeted(client: ClientConnection, conn: ServerConnection) -> ServerConnection:
    """Hand the server's greeting (drained by ``server()``) to the client."""
    assert client.receive_data(f.newstyle_greeting()) == []
    return conn
