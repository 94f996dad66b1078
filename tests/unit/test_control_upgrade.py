"""A JSON method that takes the control connection itself (``Commands.upgrades``: takeover).

The connection runs on a ``StringTransport`` that carries one end of a real
socket pair as its ``socket``, as a Unix transport does: the method gets
its own duplicate of it, and what the peer sends after the request reaches
the method, not the JSON parser.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport

from ferry.control.commands import Params
from ferry.control.server import ControlProtocol

from .test_control_events import Node


class SocketTransport(StringTransport):
    """A StringTransport over a real socket, as far as an upgrade looks."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.socket = sock
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    yield ours, peer
    ours.close()
    peer.close()


class Upgraded:
    """An upgrade that records what it was asked and keeps the socket it was given."""

    def __init__(self, refusal: str | None = None) -> None:
        self.refusal = refusal
        self.params: list[Params] = []
        self.sockets: list[socket.socket] = []

    def __call__(self, params: Params) -> Any:
        self.params.append(params)
        if self.refusal is not None:
            return self.refusal
        return self.sockets.append


def connect(node: Node, sock: socket.socket) -> tuple[ControlProtocol, SocketTransport]:
    protocol = ControlProtocol(node.commands, node.hub)
    transport = SocketTransport(sock)
    protocol.makeConnection(transport)
    return protocol, transport


def answers(transport: SocketTransport) -> list[dict[str, Any]]:
    data = transport.value()
    transport.clear()
    return [json.loads(line) for line in data.splitlines()]


def test_the_method_gets_the_connection_and_the_parser_lets_it_go(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    node = Node(tmp_path)
    upgraded = Upgraded()
    node.commands.upgrades["takeover"] = upgraded
    protocol, transport = connect(node, pair[0])
    request = {"id": 1, "method": "takeover", "params": {"export": "disk"}}
    # What follows the request in the same read is the method's, not a request.
    protocol.dataReceived(json.dumps(request).encode() + b'\n{"id": 2, "method": "status"}\n')
    assert upgraded.params == [{"export": "disk"}]
    assert transport.value() == b"" and transport.aborted  # no answer; Twisted's copy goes
    (sock,) = upgraded.sockets
    try:
        assert sock.fileno() != pair[0].fileno()  # its own duplicate, blocking
        assert sock.getblocking()
        pair[1].sendall(b"raw bytes")
        assert sock.recv(100) == b"raw bytes"
        sock.sendall(b"back")
        assert pair[1].recv(100) == b"back"
        protocol.dataReceived(b'{"id": 3, "method": "status"}\n')
        assert transport.value() == b""  # the parser answers nothing more
    finally:
        sock.close()


def test_a_refusal_is_an_error_answer_and_the_connection_goes_on(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    node = Node(tmp_path)
    node.commands.upgrades["takeover"] = Upgraded("a takeover is already under way")
    protocol, transport = connect(node, pair[0])
    protocol.dataReceived(b'{"id": 1, "method": "takeover"}\n{"id": 2, "method": "status"}\n')
    refusal, status = answers(transport)
    assert refusal == {
        "id": 1,
        "error": {"code": 1, "message": "a takeover is already under way"},
    }
    assert status["id"] == 2 and status["result"]["state"] == "serving"
    assert not transport.aborted


def test_only_the_first_request_on_a_connection_may_take_it(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    node = Node(tmp_path)
    upgraded = Upgraded()
    node.commands.upgrades["takeover"] = upgraded
    protocol, transport = connect(node, pair[0])
    protocol.dataReceived(b'{"id": 1, "method": "status"}\n{"id": 2, "method": "takeover"}\n')
    _, refusal = answers(transport)
    assert refusal["error"] == {
        "code": 1,
        "message": "takeover must be the first request on its connection",
    }
    protocol.dataReceived(b'{"id": 3, "method": "takeover", "params": [1]}\n')
    assert answers(transport)[0]["error"]["code"] == -32602
    assert upgraded.params == [] and not transport.aborted
