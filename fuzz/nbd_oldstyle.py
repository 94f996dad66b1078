#!/usr/bin/env python3
"""Fuzz target: the NBD server's parser in oldstyle mode, and flexnbd's mirror-only connection.

An oldstyle connection (``ServerConnection(oldstyle=True)``) skips
negotiation: the greeting goes out at once and transmission starts with
the first byte.  With a ``MigrationCatalog`` whose ``lookup_sender`` admits
a default export that ordinary clients are refused, the connection is
*mirror-only*, a possible ``flexnbd mirror`` sender: its only performed
requests are WRITE, WRITE_ZEROES and TRIM with the handle ``.MIRROR.``, and
FLUSH; everything else is rejected with EPERM.

The invariants checked are ``nbd_server``'s (only ``ProtocolError``, every
request performable, bounded buffering, the same events whatever the
split), plus: the first ``receive_data(b"")`` gives the waiting
``HandshakeComplete`` (or ``HandshakeAborted`` with nothing sent when
every export is refused), and the greeting is the 152-byte oldstyle hello
carrying the export's size.

Input: ``[config][split seed][client bytes]``.  Config bits 0-3 and 6 are
``nbd_server``'s (size, block size, read-only, ``max_request_size``); bits
4-5 pick the catalog: 0 the default export is served; 1 it is refused and
the migration catalog admits the sender (mirror-only); 2 everything is
refused; 3 the default export is served and a migration catalog is there too.
"""

from __future__ import annotations

import sys

from ferry.nbd.events import HandshakeAborted, HandshakeComplete
from ferry.nbd.server import ServerConnection
from fuzzing import expect, run
from nbd_server import Catalog, Connect, Migrations, Setup, check_splits

SERVED, MIRROR_ONLY, REFUSED, SERVED_WITH_MIGRATION = range(4)


def connector(mode: int) -> Connect:
    """How ``check_splits`` makes a connection with the catalog ``mode`` picks."""

    def connect(setup: Setup) -> tuple[ServerConnection, Migrations | None]:
        migrations = None
        if mode != SERVED:
            migrations = Migrations(setup, admits=False, listening=mode == MIRROR_ONLY)
        conn = ServerConnection(
            Catalog(setup, default=mode in (SERVED, SERVED_WITH_MIGRATION)),
            migration=migrations,
            oldstyle=True,
            max_request_size=setup.max_request_size,
        )
        return conn, migrations

    return connect


def check_first_call(conn: ServerConnection, mode: int) -> None:
    """The event waiting from ``__init__`` comes with the first call, even ``receive_data(b"")``."""
    first = conn.receive_data(b"")
    expect(len(first) == 1, f"the first call gave {first!r:.200}")
    if mode == REFUSED:
        expect(isinstance(first[0], HandshakeAborted), f"refused, yet {first[0]!r:.200}")
        expect(conn.closed and conn.data_to_send() == b"", "a refused connection said something")
        return
    complete = first[0]
    expect(isinstance(complete, HandshakeComplete), f"served, yet {complete!r:.200}")
    assert isinstance(complete, HandshakeComplete)
    expect(complete.flexnbd == (mode == MIRROR_ONLY), f"flexnbd is {complete.flexnbd}")
    expect(conn.mirror_only == (mode == MIRROR_ONLY), "mirror_only disagrees with the event")
    expect(conn.receive_data(b"") == [], "the waiting event came twice")


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    setup = Setup.from_byte(data[0])
    connect = connector((data[0] >> 4) & 3)
    check_first_call(connect(setup)[0], (data[0] >> 4) & 3)
    check_splits(setup, data[2:], data[1], connect=connect, oldstyle=True)


if __name__ == "__main__":
    run(check, sys.argv)
