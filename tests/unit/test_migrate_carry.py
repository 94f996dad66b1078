"""The connection machines a handoff builds: one per client, each of its own name.

Found by the simulator (``python -m ferry.sim``): two clients on one host
whose sockets had no peer to name (a connection already reset; the
simulator's transports have no socket at all) both got the machine
``disk/HOST``; their records interleaved in the trace, which then no longer
replayed ("record starts in 'established' but the machine is in 'aborted'").
"""

from __future__ import annotations

import socket

from twisted.internet import task

from ferry import statecharts
from ferry.chartnames import ConnectionTrigger
from ferry.clock import ReactorClock
from ferry.migrate.carry import Carriage
from ferry.replay import replay
from ferry.trace import Tracer, TraceRecord


class _Client:
    """A client connection as the carriage sees it, its socket already reset."""

    def __init__(self, peer_host: str) -> None:
        self.peer_host = peer_host

    @property
    def tcp_socket(self) -> socket.socket:
        raise OSError(107, "Transport endpoint is not connected")


class _Gate:
    def __init__(self, clients: list[_Client]) -> None:
        self.clients = clients


def test_two_clients_of_one_host_without_a_peer_get_machines_of_their_own() -> None:
    records: list[TraceRecord] = []
    gate = _Gate([_Client("192.0.2.7"), _Client("192.0.2.7"), _Client("192.0.2.8")])
    carriage = Carriage(
        "disk",
        gate,  # type: ignore[arg-type]
        carrier=None,
        landing=None,
        clock=ReactorClock(task.Clock()),
        tracer=Tracer(records.append),
    )
    first, second, _ = carriage.moves
    second.fire(ConnectionTrigger.ABORT)
    first.fire(ConnectionTrigger.ABORT)
    instances = [r.instance for r in records if r.event == ConnectionTrigger.ABORT]
    assert instances == ["disk/192.0.2.7#2", "disk/192.0.2.7"]
    created = {r.instance for r in records if r.event == "__created__"}
    assert created == {"disk/192.0.2.7", "disk/192.0.2.7#2", "disk/192.0.2.8"}
    result = replay([r.to_json() for r in records], statecharts.load_all())
    assert result.final_states[("connection", "disk/192.0.2.7#2")] == "aborted"
    assert result.final_states[("connection", "disk/192.0.2.8")] == "established"
