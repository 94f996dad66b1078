"""A TLS connection in the serve layer: it cannot move with the image, and its TLS
handshake is timed like any handshake.

A TLS client's session (keys, sequence numbers, buffered records) lives in
this process's OpenSSL, which a TCP_REPAIR checkpoint of the socket does not
carry, so ``why_not_movable`` must name TLS and ``session_snapshot`` must
refuse; the handoff then disconnects the client like any that cannot move
(``tests/integration/test_tls_migration.py`` shows that with real clients).
And a client that sends STARTTLS and then nothing holds a connection no
longer than one that never finishes its handshake in the clear.

Each connection here is Twisted's own ``tcp.Server`` on one end of a
loopback connection (``why_not_movable`` asks for a real TCP socket), with a
``MemoryReactorClock`` as its reactor.  The client's bytes are fed to the
protocol directly: after STARTTLS that is what the TLS layer would hand it
once decrypted.  The TLS handshake itself never runs; ``transport.TLS``
is what says TLS has started, and that is all the checks may rely on.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import task, tcp
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock

from ferry.clock import ReactorClock
from ferry.nbd.constants import TLSMode
from ferry.nbd.session import SnapshotError
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.limits import HANDSHAKE_TIMEOUT
from ferry.serve.server import NBDServer
from ferry.storage import Image
from ferry.tls import ServerTLS, load_credentials
from serve_doubles import Blocking
from tls_support import make_pki

from .nbd_frames import OPT_GO, OPT_STARTTLS, client_flags, info_data, option

SIZE = 1 << 20


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> CertificateOptions:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    return load_credentials(pki.node, server=True).server_options(verify_peer=False)


class Served:
    """One export behind an NBDServer under ``--tls on``; connections on real sockets."""

    def __init__(self, tmp_path: Path, options: CertificateOptions) -> None:
        path = tmp_path / "disk.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        self.image = Image.open(path)
        self.clock = task.Clock()  # the server's: its timers
        clock = ReactorClock(self.clock)
        self.export = Export("disk", self.image, clock=clock)
        self.export.trigger("serve")
        self.server = NBDServer(
            [self.export],
            clock=clock,
            run_blocking=Blocking(),
            tls=ServerTLS(TLSMode.ON, options),
        )
        self.reactor = MemoryReactorClock()
        self.sockets: list[socket.socket] = []

    def connect(self) -> NBDServerProtocol:
        """A connection whose client has sent nothing yet."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, address = listener.accept()
        self.sockets += [client, server]
        protocol = self.server.buildProtocol(None)
        assert isinstance(protocol, NBDServerProtocol)
        transport = tcp.Server(server, protocol, address, None, 1, self.reactor)  # type: ignore[arg-type]
        protocol.makeConnection(transport)
        return protocol

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.image.close()


@pytest.fixture
def served(tmp_path: Path, options: CertificateOptions) -> Iterator[Served]:
    served = Served(tmp_path, options)
    yield served
    served.close()


def go(protocol: NBDServerProtocol) -> None:
    protocol.dataReceived(option(OPT_GO, info_data("disk")))
    assert protocol.export_name == "disk", "the client did not reach transmission"


def test_a_plaintext_client_in_transmission_can_move(served: Served) -> None:
    protocol = served.connect()
    protocol.dataReceived(client_flags())
    go(protocol)
    assert protocol.why_not_movable() is None
    assert protocol.session_snapshot()  # its session can be written down


def test_a_tls_client_in_transmission_cannot_and_says_why(served: Served) -> None:
    protocol = served.connect()
    protocol.dataReceived(client_flags() + option(OPT_STARTTLS))
    assert protocol.transport is not None and protocol.transport.TLS  # type: ignore[attr-defined]
    go(protocol)  # what TLS decrypted
    assert protocol.why_not_movable() == "its TLS session cannot move"
    with pytest.raises(SnapshotError, match="its TLS session cannot move"):
        protocol.session_snapshot()


def test_a_client_silent_after_starttls_is_closed_at_the_handshake_time_out(
    served: Served,
) -> None:
    protocol = served.connect()
    protocol.dataReceived(client_flags() + option(OPT_STARTTLS))
    transport = protocol.transport
    assert transport is not None and transport.TLS  # type: ignore[attr-defined]
    served.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not transport.disconnecting  # type: ignore[attr-defined]
    served.clock.advance(0.1)
    served.reactor.advance(0)  # the transport's connectionLost, scheduled by the abort
    assert transport.disconnected  # type: ignore[attr-defined]
