"""A daemon's file: what it means, and one line for every way it can be wrong.

And what a reload does with the file as it was and as it is now, and the
sd_notify datagrams, received on a socket of the test's own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.daemon.config import ConfigError, DaemonConfig, load_config, parse_config
from ferry.daemon.notify import Notifier, notice
from ferry.daemon.reload import plan_reload
from ferry.exports import ExportConfig
from ferry.nbd.constants import TLSMode

GOOD = """
addr = "127.0.0.1"
port = 10809
sock = "run/ferry.sock"
metrics = "127.0.0.1:9109"
lockspace = "local:locks"
trace = "/var/log/ferry.trace"

[[export]]
name = "vm1"
file = "disks/vm1.img"

[[export]]
name = "vm2"
file = "/srv/disks/vm2.img"
mode = "listen"
read_only = true
acl = ["192.0.2.0/24", "2001:db8::1"]
default_deny = true
resource = "vm2-disk"
max_downtime = 0.5
"""


def parse(text: str, path: str = "/etc/ferry/ferry.toml") -> DaemonConfig:
    return parse_config(text, path)


def test_the_file_means_what_it_says() -> None:
    config = parse(GOOD)
    node = config.node
    assert (node.addr, node.port, node.metrics) == ("127.0.0.1", 10809, ("127.0.0.1", 9109))
    # Relative paths are the file's directory's, whatever the daemon's is.
    assert node.sock == "/etc/ferry/run/ferry.sock"
    assert node.lockspace == "local:/etc/ferry/locks"
    assert node.trace == "/var/log/ferry.trace"
    assert not node.exit_stops_node  # a migration's exit ends the export, not the daemon
    vm1, vm2 = config.exports
    assert vm1 == ExportConfig(file="/etc/ferry/disks/vm1.img", name="vm1")
    assert vm2 == ExportConfig(
        file="/srv/disks/vm2.img",
        name="vm2",
        read_only=True,
        listen=True,
        resource="vm2-disk",
        acl=("192.0.2.0/24", "2001:db8::1"),
        default_deny=True,
        max_downtime=0.5,
    )


def test_the_tls_keys_are_serve_s_options() -> None:
    config = parse(
        'tls = "require"\ntls_certificates = "pki"\ntls_verify_peer = true\n'
        'tls_allowed_subjects = "/etc/ferry/senders"\n'
    )
    node = config.node
    assert node.tls is TLSMode.REQUIRE
    assert node.tls_certificates == "/etc/ferry/pki"  # the file's directory's
    assert node.tls_verify_peer
    assert node.tls_allowed_subjects == "/etc/ferry/senders"
    plain = parse("").node
    assert (plain.tls, plain.tls_certificates, plain.tls_verify_peer) == (TLSMode.OFF, None, False)
    assert plain.tls_allowed_subjects is None
    # Certificates without TLS for clients: this node's migrations still go over TLS.
    assert parse('tls_certificates = "pki"').node.tls is TLSMode.OFF


def test_the_connection_limits_are_serve_s_options() -> None:
    node = parse("max_clients = 1024\nmax_connections_per_address = 200\n").node
    assert (node.max_clients, node.max_connections_per_address) == (1024, 200)
    plain = parse("").node
    assert (plain.max_clients, plain.max_connections_per_address) == (256, 32)


def test_a_file_of_only_exports_takes_serve_s_defaults() -> None:
    config = parse('[[export]]\nname = "a"\nfile = "/a"\n')
    assert (config.node.addr, config.node.port, config.node.sock) == ("0.0.0.0", 10809, None)
    assert config.node.lockspace is None  # the embedded default, as ferry serve
    assert parse('lockspace = "none"').node.lockspace == "none"
    assert parse("").exports == ()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("port = 10809\naddr = \n", "f.toml: not TOML: Invalid value (at line 2, column 8)"),
        ("prot = 1", "f.toml: prot: unknown setting (the file takes addr, port, sock, "),
        ('port = "10809"', "f.toml: port: must be a port number (0 to 65535), not '10809'"),
        ("port = 70000", "f.toml: port: must be a port number (0 to 65535), not 70000"),
        ("port = true", "f.toml: port: must be a port number"),
        ('metrics = "9109"', "f.toml: metrics: must be \"ADDR:PORT\", not '9109'"),
        ('lockspace = "nfs:/x"', "f.toml: lockspace: lockspace 'nfs:/x' has unknown scheme 'nfs'"),
        ('sock = ""', "f.toml: sock: must be a non-empty string, not ''"),
        ("export = 3", "f.toml: export: must be [[export]] tables"),
        ('[[export]]\nfile = "/a"', "f.toml: [[export]] #1: name: missing"),
        ('[[export]]\nname = "a"', 'f.toml: [[export]] #1 "a": file: missing'),
        (
            '[[export]]\nname = "a"\nfile = "/a"\nmode = "lisen"',
            'f.toml: [[export]] #1 "a": mode: must be "serve" or "listen", not \'lisen\'',
        ),
        (
            '[[export]]\nname = "a"\nfile = "/a"\nread_only = "yes"',
            "f.toml: [[export]] #1 \"a\": read_only: must be true or false, not 'yes'",
        ),
        (
            '[[export]]\nname = "a"\nfile = "/a"\nacl = ["10.0.0.300"]',
            "f.toml: [[export]] #1 \"a\": acl: bad ACL entry '10.0.0.300'",
        ),
        (
            '[[export]]\nname = "a"\nfile = "/a"\nacl = "10.0.0.1"',
            'f.toml: [[export]] #1 "a": acl: must be a list',
        ),
        (
            '[[export]]\nname = "a"\nfile = "/a"\nmax_downtime = 0',
            'f.toml: [[export]] #1 "a": max_downtime: must be a positive number of seconds, not 0',
        ),
        (
            '[[export]]\nname = "a"\nfile = "/a"\nnaem = "b"',
            'f.toml: [[export]] #1 "a": naem: unknown setting (an export takes name, file, ',
        ),
        (
            '[[export]]\nname = "a"\nfile = "/a"\n[[export]]\nname = "b"\nfile = "/b"\n'
            '[[export]]\nname = "a"\nfile = "/c"',
            'f.toml: [[export]] #3 "a": name: also the name of [[export]] #1',
        ),
        (
            f'[[export]]\nname = "{"x" * 4097}"\nfile = "/a"',
            "name: longer than NBD's 4096 bytes",
        ),
        (
            "max_clients = 0",
            "f.toml: max_clients: must be a whole number, 1 or more, not 0",
        ),
        (
            'max_connections_per_address = "64"',
            "f.toml: max_connections_per_address: must be a whole number, 1 or more, not '64'",
        ),
        ('tls = "yes"', 'f.toml: tls: must be one of "off", "on", "require", not \'yes\''),
        ("tls = true", 'f.toml: tls: must be one of "off", "on", "require", not True'),
        (
            'tls = "require"',
            'f.toml: tls: "require" needs tls_certificates, a directory with ca-cert.pem, '
            "server-cert.pem and server-key.pem",
        ),
        ('tls_certificates = ""', "f.toml: tls_certificates: must be a non-empty string"),
        (
            'tls_certificates = "pki"\ntls_verify_peer = "yes"',
            "f.toml: tls_verify_peer: must be true or false, not 'yes'",
        ),
        (
            'tls_certificates = "pki"\ntls_verify_peer = true',
            'f.toml: tls_verify_peer: needs tls = "on" or "require"',
        ),
        (
            'tls = "on"\ntls_certificates = "pki"\ntls_allowed_subjects = "senders"',
            "f.toml: tls_allowed_subjects: needs tls_verify_peer = true: without it no subject "
            "is verified",
        ),
    ],
)
def test_every_mistake_is_one_line_naming_the_file_and_the_key(text: str, line: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text, "f.toml")
    message = str(refused.value)
    assert "\n" not in message
    assert line in message, message


def test_a_file_that_cannot_be_read_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: No such file or directory$"):
        load_config(str(tmp_path / "missing.toml"))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'addr = "\xff"')
    with pytest.raises(ConfigError, match=r"binary\.toml: not UTF-8 \(byte 8\)$"):
        load_config(str(binary))


# -- reload --------------------------------------------------------------------------

BASE = """
port = 10809
[[export]]
name = "vm1"
file = "/vm1"
[[export]]
name = "vm2"
file = "/vm2"
[[export]]
name = "vm3"
file = "/vm3"
"""


def running(config: DaemonConfig, *names: str) -> dict[str, ExportConfig]:
    by_name = config.by_name()
    return {name: by_name[name] for name in names}


def test_a_reload_starts_new_tables_and_stops_those_that_went() -> None:
    old = parse(BASE)
    new = parse(BASE.replace('name = "vm2"\nfile = "/vm2"', 'name = "vm4"\nfile = "/vm4"'))
    plan = plan_reload(old, old, new, running(old, "vm1", "vm2", "vm3"))
    assert [c.export_name for c in plan.start] == ["vm4"]
    assert plan.stop == ("vm2",)
    assert plan.change == () and plan.node_keys == ()
    assert plan.summary() == "started vm4; stopped vm2"


def test_a_reload_applies_an_acl_and_names_what_needs_the_export_re_added() -> None:
    old = parse(BASE)
    new = parse(
        BASE.replace('file = "/vm1"', 'file = "/vm1"\nacl = ["192.0.2.1"]\nmax_downtime = 1')
        .replace('file = "/vm3"', 'file = "/elsewhere"\nread_only = true')
        .replace("port = 10809", "port = 10810")
    )
    plan = plan_reload(old, old, new, running(old, "vm1", "vm2", "vm3"))
    assert plan.start == () and plan.stop == ()
    vm1, vm3 = plan.change
    assert (vm1.name, vm1.applied, vm1.not_applied) == ("vm1", ("acl", "max_downtime"), ())
    assert (vm3.name, vm3.applied, vm3.not_applied) == ("vm3", (), ("file", "read_only"))
    assert plan.node_keys == ("port",)
    assert plan.summary() == (
        "changed vm1 (acl, max_downtime); not applied while running: vm3.file, vm3.read_only "
        "(remove the export and add it again); port (restart the daemon)"
    )


def test_a_reload_leaves_alone_what_the_file_did_not_change() -> None:
    """vm2 was handed away by a migration, vm9 added at run time: neither is the edit's."""
    old = parse(BASE)
    vm9 = ExportConfig(file="/vm9", name="vm9")
    now = {**running(old, "vm1", "vm3"), "vm9": vm9}
    assert plan_reload(old, old, old, now).summary() == "no change"
    # vm2's table changed (it is to listen for its image coming back): it starts.
    back = parse(BASE.replace('file = "/vm2"', 'file = "/vm2"\nmode = "listen"'))
    plan = plan_reload(old, old, back, now)
    assert [(c.export_name, c.listen) for c in plan.start] == [("vm2", True)]
    # A table for vm9 adopts it: only what differs is applied.
    adopted = parse(BASE + '[[export]]\nname = "vm9"\nfile = "/vm9"\ndefault_deny = true\n')
    plan = plan_reload(old, old, adopted, now)
    assert [(c.name, c.applied) for c in plan.change] == [("vm9", ("default_deny",))]


def test_a_node_key_is_named_until_the_daemon_restarts() -> None:
    started = parse(BASE)
    edited = parse(BASE.replace("port = 10809", 'port = 10810\nsock = "/run/s"'))
    first = plan_reload(started, started, edited, running(started, "vm1", "vm2", "vm3"))
    again = plan_reload(started, edited, edited, running(started, "vm1", "vm2", "vm3"))
    assert first.node_keys == again.node_keys == ("port", "sock")


def test_tls_settings_are_node_keys_a_reload_names() -> None:
    """The certificates are read at start: new ones (or a new mode) need a restart."""
    started = parse(BASE)
    edited = parse(
        'tls = "on"\ntls_certificates = "/etc/ferry/pki"\ntls_verify_peer = true\n' + BASE
    )
    plan = plan_reload(started, started, edited, running(started, "vm1", "vm2", "vm3"))
    assert plan.node_keys == ("tls", "tls_certificates", "tls_verify_peer")
    assert plan.summary() == (
        "no change; not applied while running: tls, tls_certificates, tls_verify_peer "
        "(restart the daemon)"
    )


# -- sd_notify -----------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


def test_notices_are_datagrams_of_key_value_lines(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = Notifier(path)
    notifier.ready("3 exports on 127.0.0.1:10809")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 exports on 127.0.0.1:10809\n"
    notifier.reloading("reloading /etc/ferry.toml")
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1" and fields["STATUS"] == "reloading /etc/ferry.toml"
    assert int(fields["MONOTONIC_USEC"]) > 0
    notifier.stopping("stopping")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping\n"


def test_an_abstract_socket_is_reached_through_its_at_sign() -> None:
    name = f"ferry-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier("@" + name).status("hello")
        assert sock.recv(4096) == b"STATUS=hello\n"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("ignored")  # no socket, no error


def test_a_value_is_one_line() -> None:
    with pytest.raises(ValueError, match="one line"):
        notice({"STATUS": "two\nlines"})


def test_a_gone_systemd_loses_the_notice_not_the_service(tmp_path: Path) -> None:
    Notifier(str(tmp_path / "nobody")).ready("up")  # logged, not raised


def test_hooks_are_the_daemon_s_under_each_export_s_own(tmp_path: Path) -> None:
    from ferry.hooks import HookConfig, Stage

    (tmp_path / "hooks").mkdir()
    for name in ("all.sh", "vm1.sh"):
        script = tmp_path / "hooks" / name
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
    config = parse(
        'hook_timeout = 5\nhooks = { pre-switchover = "hooks/all.sh", fenced = "hooks/all.sh" }\n'
        '[[export]]\nname = "vm1"\nfile = "vm1.img"\n'
        'hooks = { pre-switchover = "hooks/vm1.sh" }\nhook_timeout = 2.5\n'
        '[[export]]\nname = "vm2"\nfile = "vm2.img"\n',
        str(tmp_path / "ferry.toml"),
    )
    everyone = config.node.hooks
    assert everyone == HookConfig(
        (
            (Stage.PRE_SWITCHOVER, f"{tmp_path}/hooks/all.sh"),
            (Stage.FENCED, f"{tmp_path}/hooks/all.sh"),
        ),
        5,
    )
    vm1, vm2 = config.exports
    merged = vm1.hooks.under(everyone)
    assert merged.script(Stage.PRE_SWITCHOVER) == f"{tmp_path}/hooks/vm1.sh"  # its own first
    assert merged.script(Stage.FENCED) == f"{tmp_path}/hooks/all.sh"
    assert merged.seconds == 2.5
    assert vm2.hooks.under(everyone).seconds == 5


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('hooks = { preflight = "/bin/true" }', "hooks: no stage 'preflight'"),
        ('hooks = { pre-migrate = "nope.sh" }', "no such file"),
        ("hook_timeout = 0", "hook_timeout: hook_timeout must be a positive number"),
        (
            '[[export]]\nname = "a"\nfile = "a.img"\nhooks = ["x"]',
            '[[export]] #1 "a": hooks: hooks must be a table of STAGE = PATH',
        ),
    ],
)
def test_a_bad_hook_is_one_line(text: str, line: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(text)
    assert line in str(error.value)
