"""The ACL rules and the status snapshot's renderings."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.serve.acl import Acl, AclError
from ferry.status import STATUS_FIELDS, StatusSnapshot, parse_line, render_value


def test_an_empty_acl_admits_everyone_unless_default_deny() -> None:
    assert Acl.parse([]).allows("192.0.2.7")
    assert not Acl.parse([], default_deny=True).allows("192.0.2.7")


def test_a_non_empty_acl_admits_only_what_it_names() -> None:
    acl = Acl.parse(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"], default_deny=False)
    assert acl.allows("10.200.1.1")
    assert acl.allows("192.0.2.7")
    assert not acl.allows("192.0.2.8")
    assert acl.allows("2001:db8::1")
    assert not acl.allows("2001:db9::1")
    assert acl.allows("::ffff:10.1.1.1")  # IPv4 through a dual-stack socket
    assert not acl.allows("not-an-address")


@pytest.mark.parametrize("entry", ["300.1.2.3", "10.0.0.0/33", "host.example", ""])
def test_bad_entries_name_themselves(entry: str) -> None:
    with pytest.raises(AclError, match="bad ACL entry"):
        Acl.parse(["10.0.0.1", entry])


def test_a_migration_sender_must_be_named_or_on_loopback_while_the_acl_is_empty() -> None:
    empty = Acl.parse([])
    assert empty.admits_sender("127.0.0.1") and empty.admits_sender("::1")
    assert empty.admits_sender("::ffff:127.0.0.5")
    assert not empty.admits_sender("192.0.2.7")  # an empty ACL lets everyone be a client ...
    assert empty.allows("192.0.2.7")  # ... but nobody from the network hand it an image
    assert not Acl.parse([], default_deny=True).admits_sender("127.0.0.1")
    named = Acl.parse(["192.0.2.0/24"])
    assert named.admits_sender("192.0.2.7")
    assert not named.admits_sender("127.0.0.1")  # once there is a list, only the list
    assert not named.admits_sender("not-an-address")


def test_with_an_export_s_acl_a_sender_must_pass_both_and_be_named_by_one() -> None:
    """A daemon's export has its own ACL beside the listener's (which is often empty)."""
    everyone, nobody = Acl.parse([]), Acl.parse([], default_deny=True)
    sources = Acl.parse(["192.0.2.0/24"])
    assert everyone.admits_sender("192.0.2.7", sources)  # the export's names it
    assert not everyone.admits_sender("198.51.100.9", sources)  # ... and only what it names
    assert not everyone.admits_sender("192.0.2.7", everyone)  # neither names anyone
    assert everyone.admits_sender("127.0.0.1", everyone)  # ... so loopback only
    assert not everyone.admits_sender("127.0.0.1", sources)  # the export's list is the list
    assert not everyone.admits_sender("127.0.0.1", nobody)  # the export admits no one
    assert sources.admits_sender("192.0.2.7", everyone)  # the listener's names it
    assert not sources.admits_sender("192.0.2.7", Acl.parse(["10.0.0.0/8"]))  # one refuses
    assert not nobody.admits_sender("192.0.2.7", sources)


def test_the_line_keeps_flexnbd_order_and_leaves_out_absent_fields() -> None:
    snapshot = StatusSnapshot(
        export="disk",
        pid=42,
        size=1024,
        is_mirroring=False,
        clients_allowed=True,
        num_clients=2,
        has_control=True,
        is_migrating=False,
        state="serving",
    )
    assert snapshot.to_line() == (
        "pid=42 size=1024 is_mirroring=false clients_allowed=true num_clients=2 "
        "has_control=true is_migrating=false state=serving"
    )
    assert snapshot.to_dict()["num_clients"] == 2


def test_every_field_has_an_export_spec_and_a_unique_metric() -> None:
    specs = [f.metadata["spec"] for f in dataclasses.fields(StatusSnapshot) if "spec" in f.metadata]
    assert len(specs) == len(STATUS_FIELDS)
    gauges = [s.metric for s in specs if s.kind == "gauge"]
    assert len(gauges) == len(set(gauges))
    for spec in specs:
        assert not spec.metric.endswith("_total")


def test_values_render_without_spaces_or_equals() -> None:
    assert render_value(True) == "true"
    assert render_value(0.25) == "0.25"
    assert render_value(3.0) == "3"
    with pytest.raises(ValueError):
        render_value("a b")


@given(st.integers(min_value=0), st.integers(min_value=0, max_value=10_000), st.booleans())
def test_the_line_parses_back(size: int, clients: int, control: bool) -> None:
    snapshot = StatusSnapshot(export="x", size=size, num_clients=clients, has_control=control)
    assert parse_line(snapshot.to_line()) == {
        "size": str(size),
        "num_clients": str(clients),
        "has_control": str(control).lower(),
    }
