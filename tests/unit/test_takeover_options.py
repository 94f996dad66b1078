"""Whose options a takeover uses: the old process's, checked against those written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferry.node import NodeConfig, StartupError
from ferry.takeover.options import differences, served_exports


def served(tmp_path: Path, **node: Any) -> dict[str, Any]:
    """A ``served`` answer: a node on 127.0.0.1:10900 with exports disk and spare."""
    for name in ("disk", "spare"):
        (tmp_path / f"{name}.img").write_bytes(b"\0" * 4096)
    return {
        "node": {
            "addr": "127.0.0.1",
            "port": 10900,
            "sock": str(tmp_path / "ctl.sock"),
            "acl": ["10.0.0.0/8", "192.0.2.1/32"],
            "default_deny": False,
            "oldstyle": False,
            "metrics": ["127.0.0.1", 9100],
            "lockspace": f"local:{tmp_path}/locks",
            "service_address": None,
            "tls": "off",
            "tls_certificates": None,
            "tls_verify_peer": False,
            "tls_allowed_subjects": None,
            "hooks": None,
            "hook_timeout": None,
            **node,
        },
        "exports": [
            {
                "name": "disk",
                "file": str(tmp_path / "disk.img"),
                "description": "the root disk",
                "read_only": False,
                "acl": [],
                "default_deny": False,
                "resource": "vm1",
                "max_downtime": 2.5,
                "hooks": {"post-takeover": "/bin/true"},
                "hook_timeout": 5.0,
                "lease_owner": "host:41:disk",
            },
            {
                "name": "spare",
                "file": str(tmp_path / "spare.img"),
                "description": "",
                "read_only": True,
                "acl": ["192.0.2.0/24"],
                "default_deny": True,
                "resource": None,
                "max_downtime": None,
                "hooks": {},
                "hook_timeout": None,
                "lease_owner": None,
            },
        ],
    }


def test_what_was_written_as_the_old_process_has_it_is_no_difference(tmp_path: Path) -> None:
    answer = served(tmp_path)
    answer["exports"].pop()  # serve's options about its export compare with a lone export
    (tmp_path / "link.img").symlink_to(tmp_path / "disk.img")
    given = {
        "addr": "127.0.0.1",
        "port": 0,  # any free port: the old one's is
        "acl": ["192.0.2.1", "10.1.2.3/8"],  # the same networks, another order and spelling
        "metrics": ("127.0.0.1", 0),
        "lockspace": f"local:{tmp_path}/locks/",
        "file": str(tmp_path / "link.img"),  # the same file, by another path
        "name": "disk",
        "resource": "vm1",
    }
    assert differences(given, answer) == []


def test_each_difference_is_one_line_naming_the_option_and_both_values(tmp_path: Path) -> None:
    answer = served(tmp_path)
    answer["exports"].pop()
    (tmp_path / "other.img").write_bytes(b"\0")
    lines = differences(
        {"port": 10901, "read_only": True, "file": str(tmp_path / "other.img"), "oldstyle": False},
        answer,
    )
    assert lines == [
        "--port 10901 is not the old process's 10900: leave it out to take the old process's",
        "--read-only on is not the old process's off: leave it out to take the old process's",
        f"--file {tmp_path / 'other.img'} is not the old process's {tmp_path / 'disk.img'}: "
        "leave it out to take the old process's",
    ]


def test_the_exports_are_the_old_process_s_as_they_run_in_its_order(tmp_path: Path) -> None:
    disk, spare = served_exports(served(tmp_path))
    assert (disk.export_name, disk.description, disk.resource, disk.max_downtime) == (
        "disk",
        "the root disk",
        "vm1",
        2.5,
    )
    assert (spare.read_only, spare.acl, spare.default_deny) == (True, ("192.0.2.0/24",), True)
    assert disk.hooks.settings() == {"post-takeover": "/bin/true"} and disk.hooks.timeout == 5.0
    assert not spare.hooks.scripts
    assert not disk.listen and not spare.listen


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda e: e.update(name=""), "name"),
        (lambda e: e.update(acl=["not an address"]), "acl"),
        (lambda e: e.update(read_only="yes"), "read_only"),
        (lambda e: e.update(description=7), "description"),
        (lambda e: e.pop("resource"), "resource"),
        (lambda e: e.update(hooks={"post-takeover": "/no/such/hook"}), "hooks"),
    ],
)
def test_an_export_that_cannot_be_read_is_refused_naming_it(
    tmp_path: Path, change: Any, why: str
) -> None:
    answer = served(tmp_path)
    change(answer["exports"][0])
    with pytest.raises((ValueError, KeyError), match=why):
        served_exports(answer)


def test_the_node_is_the_old_one_s_with_this_process_s_trace(tmp_path: Path) -> None:
    node = NodeConfig.from_served(served(tmp_path), trace="mine.jsonl", exit_stops_node=False)
    assert (node.addr, node.port, node.metrics) == ("127.0.0.1", 10900, ("127.0.0.1", 9100))
    assert node.acl == ("10.0.0.0/8", "192.0.2.1/32") and node.trace == "mine.jsonl"
    assert not node.exit_stops_node and node.tls.value == "off" and node.hooks is None
    with pytest.raises(StartupError, match="'sometimes' is not a valid TLSMode"):
        NodeConfig.from_served(served(tmp_path, tls="sometimes"), trace=None, exit_stops_node=True)
    with pytest.raises(StartupError, match="port is '10900', not a int"):
        NodeConfig.from_served(served(tmp_path, port="10900"), trace=None, exit_stops_node=True)


def test_the_connection_limits_are_the_old_process_s(tmp_path: Path) -> None:
    node = NodeConfig.from_served(
        served(tmp_path, max_clients=512, max_connections_per_address=100),
        trace=None,
        exit_stops_node=True,
    )
    assert (node.max_clients, node.max_connections_per_address) == (512, 100)
    # A giver from before the options existed served the defaults.
    older = NodeConfig.from_served(served(tmp_path), trace=None, exit_stops_node=True)
    assert (older.max_clients, older.max_connections_per_address) == (256, 32)
    with pytest.raises(StartupError, match="max_clients is 0, not 1 or more"):
        NodeConfig.from_served(served(tmp_path, max_clients=0), trace=None, exit_stops_node=True)
    answer = served(tmp_path, max_connections_per_address=100)
    assert differences({"max_connections_per_address": 64}, answer) == [
        "--max-connections-per-address 64 is not the old process's 100: "
        "leave it out to take the old process's"
    ]
