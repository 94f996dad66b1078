"""The proxy's status line, its /metrics and its finders, without a network."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from ferry.clock import ReactorClock
from ferry.lease.backend import LockspaceUnavailable
from ferry.nbd.locate import Location
from ferry.proxy.finder import FixedAddress, LockspaceFinder, parse_address
from ferry.proxy.listener import ProxyServer
from ferry.proxy.status import ProxyCommands, make_registry, snapshot
from ferry.proxy.upstream import Dialer
from ferry.status import parse_line

HERE = Location("10.0.0.1", 10809, "disk")


def server() -> ProxyServer:
    clock = ReactorClock(task.Clock())
    finder = FixedAddress(HERE)
    dialer = Dialer(connector=lambda *args: defer.Deferred(), clock=clock)
    return ProxyServer(export_name="disk", finder=finder, dialer=dialer, clock=clock)


def test_the_status_line_has_every_field_and_no_upstream_before_one_is_reached() -> None:
    proxy = server()
    line = ProxyCommands(proxy).run("status", []).line()
    assert line.startswith("0: pid=")
    fields = parse_line(line[3:])
    assert "upstream" not in fields
    assert fields["num_clients"] == "0" and fields["longest_pause_ms"] == "0"
    proxy.stats.upstream = "10.0.0.2:10810"
    proxy.stats.reconnects = 2
    proxy.stats.requests_replayed = 17
    proxy.stats.pause(0.4123)
    status = snapshot(proxy)
    assert status.to_dict()["upstream"] == "10.0.0.2:10810"
    assert parse_line(status.to_line())["longest_pause_ms"] == "412"
    assert ProxyCommands(proxy).run("", []).line() == "9: missing command\n"
    assert ProxyCommands(proxy).run("mirror", []).line() == "10: unknown command\n"


def test_metrics_carry_the_same_fields_in_base_units() -> None:
    proxy = server()
    proxy.stats.upstream = "10.0.0.2:10810"
    proxy.stats.reconnects = 3
    proxy.stats.pause(1.5)
    proxy.stats.errors["EIO"] += 2
    text = generate_latest(make_registry(proxy)).decode()
    assert 'ferry_proxy_upstream_info{address="10.0.0.2:10810",export="disk"} 1.0' in text
    assert 'ferry_proxy_reconnects_total{export="disk"} 3.0' in text
    assert 'ferry_proxy_longest_pause_seconds{export="disk"} 1.5' in text
    assert 'ferry_proxy_request_errors_total{errno="EIO",export="disk"} 2.0' in text
    assert 'ferry_proxy_clients{export="disk",state="failed"} 0.0' in text


class Directory:
    spec = "etcd:http://10.0.0.9:2379"

    def __init__(self, answer: list[str] | Exception) -> None:
        self.answer = answer

    def where(self, resource: str) -> defer.Deferred[list[str]]:
        if isinstance(self.answer, Exception):
            return defer.fail(Failure(self.answer))
        return defer.succeed(list(self.answer))


def located(finder: Any) -> list[Location]:
    found: list[list[Location]] = []
    finder.locations().addCallback(found.append)
    return found[0]


def test_the_lockspace_names_the_holder_first_then_the_fixed_address() -> None:
    finder = LockspaceFinder(Directory(["[fe80::2]:10810"]), "vm1", HERE, "disk")
    assert located(finder) == [Location("fe80::2", 10810, "disk"), HERE]
    assert located(LockspaceFinder(Directory([]), "vm1", HERE, "disk")) == [HERE]
    # The holder is at the fixed address: once.
    assert located(LockspaceFinder(Directory(["10.0.0.1:10809"]), "vm1", HERE, "disk")) == [HERE]


def test_a_lockspace_that_cannot_answer_or_names_nonsense_leaves_the_fixed_address() -> None:
    unavailable = Directory(LockspaceUnavailable("no etcd endpoint answered"))
    assert located(LockspaceFinder(unavailable, "vm1", HERE, "disk")) == [HERE]
    nonsense = Directory(["nowhere", "host:99999", "[::1:10809"])
    assert located(LockspaceFinder(nonsense, "vm1", HERE, "disk")) == [HERE]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:10809", ("10.0.0.1", 10809)),
        ("[::1]:1", ("::1", 1)),
        ("h.example:7", ("h.example", 7)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", ":10809", "h:0", "h:65536", "[::1:5", "h:x"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
