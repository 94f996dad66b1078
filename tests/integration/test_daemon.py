"""``ferry daemon``: many exports in one real process, changed while real clients write.

Every client here is libnbd's (nbdinfo, nbdsh, and ``workload.py``, which
writes a checkable pattern until told to stop), every change goes through
the real command line (``ferry export``, ``ferry reload``, SIGHUP), and
every image is checked byte for byte at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.status import parse_line
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    Writers,
    check_acked,
    daemon,
    mirror_command,
    nbdsh,
    random_file,
    read_line,
    run,
    sparse_file,
    wait_until,
)
from tls_support import PKI, pki_fixture
from workload import BLOCK

pytestmark = pytest.mark.integration

__all__ = ["pki_fixture"]  # the certificates: pytest finds the fixture by its name

MiB = 1 << 20
SIZE = 8 * MiB


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def write_config(path: Path, exports: list[dict[str, Any]], **node: Any) -> Path:
    """A daemon's file: the node's keys, then one ``[[export]]`` table per dict."""
    lines = [f"{key} = {toml_value(value)}" for key, value in node.items()]
    for export in exports:
        lines += ["", "[[export]]"] + [f"{k} = {toml_value(v)}" for k, v in export.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Host:
    """A directory with images, a private lockspace, and a daemon's file naming them."""

    def __init__(self, root: Path, name: str = "host") -> None:
        self.root = root / name
        self.root.mkdir()
        (self.root / "locks").mkdir(mode=0o700)
        self.sock = self.root / "ferry.sock"
        self.config = self.root / "ferry.toml"

    def image(self, name: str, *, seed: int | None = None) -> Path:
        path = self.root / f"{name}.img"
        if seed is None:
            return sparse_file(path, SIZE)
        return random_file(path, SIZE, seed=seed)

    def write(self, exports: list[dict[str, Any]], **node: Any) -> Path:
        settings = {
            "addr": "127.0.0.1",
            "port": 0,
            "sock": "ferry.sock",  # relative: the file's directory
            "metrics": "127.0.0.1:0",
            "lockspace": "local:locks",
            "trace": "trace.jsonl",
            **node,
        }
        return write_config(self.config, exports, **settings)


def export_table(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "file": f"{name}.img", **extra}


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def three(host: Host) -> Iterator[FerryProcess]:
    """A daemon serving a, b and c from its file."""
    for seed, name in enumerate("abc", start=1):
        host.image(name, seed=seed)
    host.write([export_table(name) for name in "abc"])
    process = daemon(host.config)
    try:
        yield process
    finally:
        process.stop()


def listed(port: int) -> list[str]:
    """The export names nbdinfo --list reports."""
    out = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"]).stdout
    return [export["export-name"] for export in json.loads(out)["exports"]]


def ferry(*args: str, check: bool = True) -> str:
    result = run([*FERRY, *args], check=check)
    return (result.stdout + result.stderr).decode()


def exports(sock: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(ferry("export", "list", "--sock", str(sock), "--json"))
    return {row["name"]: row for row in rows}


def metric_labels(process: FerryProcess, metric: str, label: str) -> dict[str, float]:
    """``metric``'s value by its ``label`` value, from the one /metrics of the process."""
    with urllib.request.urlopen(process.metrics_url(), timeout=30) as answer:
        text = answer.read().decode()
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    }


def written(process: FerryProcess, name: str) -> float:
    return metric_labels(process, "ferry_written_bytes_total", "export").get(name, 0.0)


def test_three_exports_from_a_file_each_reached_by_name(host: Host, three: FerryProcess) -> None:
    assert listed(three.port) == ["a", "b", "c"]
    # A real client on each export, by name: each writes its own bytes.
    for name in "abc":
        script = (
            f"h.pwrite(b'{name}' * 4096, {BLOCK}); h.flush(); "
            f"assert h.pread(4096, {BLOCK}) == b'{name}' * 4096; print(h.get_size())"
        )
        assert nbdsh(three.uri(name), script).stdout.strip() == str(SIZE).encode()
    for name in "abc":
        assert (host.root / f"{name}.img").read_bytes()[BLOCK : 2 * BLOCK] == name.encode() * 4096
    # One /metrics for them all, labelled by export.
    roles = metric_labels(three, "ferry_state", "export")
    assert set(roles) == {"a", "b", "c"}
    assert set(metric_labels(three, "ferry_written_bytes_total", "export")) == {"a", "b", "c"}
    # The control socket answers about any of them by name.
    status = parse_line(ferry("status", "--sock", str(host.sock), "--export", "b"))
    assert (status["state"], status["has_control"], status["lease_state"]) == (
        "serving",
        "true",
        "held",
    )
    rows = exports(host.sock)
    assert [rows[name]["state"] for name in "abc"] == ["serving"] * 3
    assert rows["a"]["file"] == str(host.root / "a.img")
    unknown = run([*FERRY, "status", "--sock", str(host.sock), "--export", "z"], check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.decode() == "ferry: no export named 'z'\n"


def test_an_export_added_and_one_removed_while_the_others_keep_writing(
    host: Host, three: FerryProcess, tmp_path: Path
) -> None:
    host.image("d", seed=4)
    out = ferry(
        "export", "add", "--sock", str(host.sock), "--name", "d", "--file", str(host.root / "d.img")
    )
    assert out == "export 'd' added: serving\n"
    assert listed(three.port) == ["a", "b", "c", "d"]
    writers = Writers({name: three.uri(name) for name in "abcd"}, SIZE // BLOCK, tmp_path / "stop")
    try:
        for name in "abcd":
            wait_until(f"{name} is written", lambda name=name: written(three, name) > 0)
        before = {name: written(three, name) for name in "acd"}
        removed = ferry("export", "remove", "--sock", str(host.sock), "--name", "b")
        assert removed == "export 'b' removed\n"
        assert listed(three.port) == ["a", "c", "d"]
        # The others' clients go on writing after b has gone.
        for name in "acd":
            wait_until(
                f"{name} is written after b went", lambda n=name: written(three, n) > before[n]
            )
    finally:
        reports = writers.stop()
    for name in "acd":
        assert (reports[name]["ended"], reports[name]["error"]) == ("stopped", ""), reports[name]
    # b's client was drained: what it was told "done" is on b's disk (checked below).
    assert reports["b"]["ended"] == "error" and reports["b"]["writes"] > 0
    assert set(exports(host.sock)) == {"a", "c", "d"}
    refused = run(["nbdinfo", three.uri("b")], check=False)
    assert refused.returncode != 0 and b"No such file or directory for export: b" in refused.stderr
    # b's lease is given back: another process may take it now.
    assert three.stop() == 0
    for name, report in reports.items():
        check_acked(report, (host.root / f"{name}.img").read_bytes())


def test_remove_refuses_a_migrating_export_unless_forced(host: Host, tmp_path: Path) -> None:
    host.image("a", seed=1)
    host.write([export_table("a")])
    source = daemon(host.config)
    other = Host(tmp_path, "other")
    other.image("a")
    other.write([export_table("a", mode="listen")])
    dest = daemon(other.config)
    try:
        # A slow migration: it is running while we try to remove its export.
        started = run(
            mirror_command(
                dest.port, host.sock, "--export", "a", "--max-bps", "65536", "--action", "nothing"
            )
        )
        assert b"Mirror started" in started.stdout
        refused = run(
            [*FERRY, "export", "remove", "--sock", str(host.sock), "--name", "a"], check=False
        )
        assert refused.returncode == 1
        assert refused.stderr.decode() == (
            "ferry: export 'a' is migrating out: break the migration first, "
            "or remove it with force\n"
        )
        assert exports(host.sock)["a"]["migrating"] == "out"
        # The destination's export refuses too, while the image comes in.
        refused = run(
            [*FERRY, "export", "remove", "--sock", str(other.sock), "--name", "a"], check=False
        )
        assert refused.stderr.decode().startswith("ferry: export 'a' is migrating in")
        forced = ferry("export", "remove", "--sock", str(host.sock), "--name", "a", "--force")
        assert forced == "export 'a' removed\n"
        assert exports(host.sock) == {}
        wait_until(
            "the listener listens again", lambda: exports(other.sock)["a"]["state"] == "listening"
        )
    finally:
        dest.stop()
        source.stop()


def test_a_migration_from_a_daemon_into_another_daemon_s_listening_export(
    tmp_path: Path,
) -> None:
    """x moves from one daemon to the other with its client; y and z there, w here, keep
    theirs."""
    source_host, dest_host = Host(tmp_path, "source"), Host(tmp_path, "dest")
    locks = f"local:{tmp_path / 'locks'}"  # both daemons on one host: one lockspace
    (tmp_path / "locks").mkdir(mode=0o700)
    for seed, name in enumerate("xyz", start=1):
        source_host.image(name, seed=seed)
    dest_host.image("x")
    dest_host.image("w", seed=9)
    source_host.write([export_table(name) for name in "xyz"], lockspace=locks)
    dest_host.write([export_table("x", mode="listen"), export_table("w")], lockspace=locks)
    source = daemon(source_host.config)
    dest = daemon(dest_host.config)
    try:
        uris = {
            "x": source.uri("x"),
            "y": source.uri("y"),
            "z": source.uri("z"),
            "w": dest.uri("w"),
        }
        writers = Writers(uris, SIZE // BLOCK, tmp_path / "stop")
        try:
            wait_until("x is written", lambda: written(source, "x") > 0)
            migrated = run(
                mirror_command(dest.port, source_host.sock, "--export", "x", "--wait"),
                timeout=120,
            ).stdout.decode()
            assert migrated.rstrip().endswith("has control of the image"), migrated
            # x's client moved with its image (TCP_REPAIR) and writes on, at the destination.
            handed = written(dest, "x")
            wait_until("x's client writes at the destination", lambda: written(dest, "x") > handed)
            # The exit action removed x from the source daemon, not the daemon.
            wait_until("x left the source", lambda: "x" not in exports(source_host.sock))
            before = {name: written(source, name) for name in "yz"}
            for name in "yz":
                wait_until(
                    f"{name} is still written", lambda n=name: written(source, n) > before[n]
                )
        finally:
            reports = writers.stop()
        # No client saw a thing: x's moved, the others stayed where they were.
        for name in "xyzw":
            assert (reports[name]["ended"], reports[name]["error"]) == ("stopped", ""), reports
        rows = exports(dest_host.sock)
        assert (rows["x"]["state"], rows["x"]["lease"]["state"]) == ("serving", "held")
        status = ferry("status", "--sock", str(dest_host.sock), "--export", "x", "--json")
        moves = json.loads(status)
        assert (moves["connections_moved"], moves["connections_aborted"]) == (1, 0), moves
        assert listed(source.port) == ["y", "z"]
        assert listed(dest.port) == ["x", "w"]
        # The destination answers real clients for x, on its one port.
        size = nbdsh(dest.uri("x"), "print(h.get_size())").stdout.strip()
        assert size == str(SIZE).encode()
    finally:
        assert dest.stop() == 0
        assert source.stop() == 0
    # x's writes, before and after the move, are at the destination; every block its
    # client never wrote is the source's.
    moved = (dest_host.root / "x.img").read_bytes()
    check_acked(reports["x"], moved)
    original = (source_host.root / "x.img").read_bytes()
    written_x = {int(o) for part in ("acked", "unanswered") for o in reports["x"][part]}
    for offset in range(0, SIZE, BLOCK):
        if offset not in written_x:
            assert moved[offset : offset + BLOCK] == original[offset : offset + BLOCK], offset
    for name in "yz":
        check_acked(reports[name], (source_host.root / f"{name}.img").read_bytes())
    check_acked(reports["w"], (dest_host.root / "w.img").read_bytes())
    for trace in (source_host.root / "trace.jsonl", dest_host.root / "trace.jsonl"):
        run([*FERRY, "trace", "replay", str(trace)])


def test_a_reload_adds_and_removes_exports_and_leaves_the_others_alone(
    host: Host, three: FerryProcess, tmp_path: Path
) -> None:
    host.image("d", seed=4)
    writers = Writers({"a": three.uri("a")}, SIZE // BLOCK, tmp_path / "stop")
    try:
        wait_until("a is written", lambda: written(three, "a") > 0)
        host.write(
            [export_table("a"), export_table("c", acl=["192.0.2.1"]), export_table("d")],
        )
        out = ferry("reload", "--sock", str(host.sock))
        assert out == (f"reloaded {host.config}: started d; stopped b; changed c (acl)\n")
        assert listed(three.port) == ["a", "d"]  # c's ACL no longer admits us
        refused = run(
            [*FERRY, "read", "-l", "127.0.0.1", "-p", str(three.port), "-n", "c", "-F0", "-S1"],
            check=False,
        )
        assert b"export 'c' does not admit 127.0.0.1" in refused.stderr, refused.stderr
        # SIGHUP does the same: b comes back, c admits everyone again.
        host.write([export_table(name) for name in "abcd"])
        three.proc.send_signal(signal.SIGHUP)
        three.wait_for_log(f"reloaded {host.config}: started b; changed c (acl)")
        assert listed(three.port) == ["a", "c", "d", "b"]
        before = written(three, "a")
        wait_until("a is still written", lambda: written(three, "a") > before)
    finally:
        reports = writers.stop()
    assert (reports["a"]["ended"], reports["a"]["error"]) == ("stopped", "")
    assert three.stop() == 0
    check_acked(reports["a"], (host.root / "a.img").read_bytes())


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ('port = "ten"', "port: must be a port number (0 to 65535), not 'ten'"),
        ("[[export]]\nname = 'e'", '[[export]] #4 "e": file: missing'),
        ("[[export]\nname = 'e'", "not TOML: "),
        (
            "[[export]]\nname = 'e'\nfile = 'missing.img'",
            "export 'e': image ",  # the file is checked by opening it: nothing starts
        ),
    ],
)
def test_a_broken_file_is_refused_whole_and_nothing_changes(
    host: Host, three: FerryProcess, edit: str, why: str
) -> None:
    """Each broken file also drops b and adds d: neither happens."""
    host.image("d", seed=4)
    good = [export_table("a"), export_table("c"), export_table("d")]
    if edit.startswith("port"):
        host.write(good, port="ten")
    else:
        host.write(good)
        host.config.write_text(host.config.read_text() + edit + "\n")
    refused = run([*FERRY, "reload", "--sock", str(host.sock)], check=False)
    assert refused.returncode == 1
    message = refused.stderr.decode()
    assert message.startswith(f"ferry: reload refused: {host.config}: "), message
    assert why in message and message.count("\n") == 1, message
    assert listed(three.port) == ["a", "b", "c"]
    assert set(exports(host.sock)) == {"a", "b", "c"}
    # SIGHUP refuses it the same way, in the log.
    three.proc.send_signal(signal.SIGHUP)
    assert why in three.wait_for_log("reload refused: ")
    assert listed(three.port) == ["a", "b", "c"]


def test_systemd_hears_ready_reloading_and_stopping_in_order(host: Host, tmp_path: Path) -> None:
    import socket

    for name in "ab":
        host.image(name)
    host.write([export_table("a"), export_table("b", mode="listen")])
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(30)

        def next_notice() -> dict[str, str]:
            lines = notify.recv(4096).decode().splitlines()
            return dict(line.split("=", 1) for line in lines)

        process = daemon(host.config, env={**os.environ, "NOTIFY_SOCKET": path})
        try:
            ready = next_notice()
            where = f"127.0.0.1:{process.port}"
            assert ready == {
                "READY": "1",
                "STATUS": f"2 exports on {where} (1 listening, 1 serving), 0 clients",
            }
            host.write([export_table("a")])
            process.proc.send_signal(signal.SIGHUP)
            reloading = next_notice()
            assert (reloading["RELOADING"], reloading["STATUS"]) == (
                "1",
                f"reloading {host.config}",
            )
            assert int(reloading["MONOTONIC_USEC"]) > 0
            assert next_notice() == {
                "READY": "1",
                "STATUS": f"1 export on {where} (1 serving), 0 clients",
            }
            ferry("export", "remove", "--sock", str(host.sock), "--name", "a")
            assert next_notice() == {"STATUS": f"0 exports on {where}, 0 clients"}
        finally:
            assert process.stop() == 0
        assert next_notice() == {"STOPPING": "1", "STATUS": "stopping 0 exports"}


def test_the_line_protocol_still_speaks_to_the_default_export(
    host: Host, three: FerryProcess
) -> None:
    """flexnbd's form has no place for an export: it is the daemon's first."""
    from ferry.control.client import line_command

    status, text = line_command(str(host.sock), ["status"])
    assert status == 0 and parse_line(text)["state"] == "serving"
    assert line_command(str(host.sock), ["break"]) == (1, "not mirroring")


def test_events_follow_one_export(host: Host, three: FerryProcess) -> None:
    """``ferry events --export b`` prints b's transitions, and none of a's."""
    events = subprocess.Popen(
        [*FERRY, "events", "--sock", str(host.sock), "--export", "b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert events.stderr is not None and events.stdout is not None
        read_line(events.stderr, Deadline())  # "following": the current records are out
        ferry("export", "remove", "--sock", str(host.sock), "--name", "a")
        ferry("export", "remove", "--sock", str(host.sock), "--name", "b")
        seen = []
        deadline = Deadline()
        while not seen or seen[-1]["dest"] != "stopped" or seen[-1]["machine"] != "role":
            seen.append(json.loads(read_line(events.stdout, deadline)))
    finally:
        events.terminate()
        events.wait(timeout=30)
    lease = str(host.root / "b.img")
    assert {(r["machine"], r["instance"]) for r in seen} == {("role", "b"), ("lease", lease)}
    assert [r["dest"] for r in seen if r["machine"] == "role"] == ["serving", "stopped"]


REPO = Path(__file__).resolve().parents[2]


def test_the_sample_file_is_a_good_file() -> None:
    from ferry.daemon.config import load_config

    config = load_config(str(REPO / "contrib" / "ferry.toml"))
    assert [(e.export_name, e.mode) for e in config.exports] == [
        ("vm1", "serve"),
        ("vm2", "serve"),
        ("vm3", "listen"),
    ]
    assert config.node.sock == "/run/ferry/ferry.sock"
    # Its TLS lines, uncommented, are good too.
    from ferry.daemon.config import parse_config
    from ferry.nbd.constants import TLSMode

    sample = (REPO / "contrib" / "ferry.toml").read_text()
    with_tls = "\n".join(
        line.removeprefix("# ") if line.startswith("# tls") else line
        for line in sample.splitlines()
    )
    node = parse_config(with_tls, "/etc/ferry/ferry.toml").node
    assert (node.tls, node.tls_certificates, node.tls_verify_peer) == (
        TLSMode.REQUIRE,
        "/etc/ferry/pki",
        True,
    )
    assert node.tls_allowed_subjects == "/etc/ferry/senders"


def test_the_unit_file_is_one_systemd_accepts(tmp_path: Path) -> None:
    """``systemd-analyze verify``, with ExecStart pointed at a ferry that exists here."""
    unit = (REPO / "contrib" / "ferry.service").read_text()
    assert "Type=notify\n" in unit and "ExecReload=/bin/kill -HUP $MAINPID\n" in unit
    assert "ExecStart=/usr/local/bin/ferry daemon --config /etc/ferry/ferry.toml\n" in unit
    here = tmp_path / "ferry.service"
    here.write_text(unit.replace("/usr/local/bin/ferry", FERRY[0]))
    result = run(["systemd-analyze", "verify", "--man=no", str(here)], check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()


def test_a_daemon_that_cannot_start_says_why_in_one_line(host: Host) -> None:
    host.write([export_table("a", mode="lisen")])
    refused = run([*FERRY, "daemon", "--config", str(host.config)], check=False)
    assert (refused.returncode, refused.stderr.decode()) == (
        1,
        f'ferry: {host.config}: [[export]] #1 "a": mode: must be "serve" or "listen", '
        "not 'lisen'\n",
    )
    host.image("a")
    host.write([export_table("a"), export_table("b")])  # b.img does not exist
    refused = run([*FERRY, "daemon", "--config", str(host.config)], check=False)
    assert refused.returncode == 1
    last = refused.stderr.decode().splitlines()[-1]  # after the log of what it opened
    assert last.startswith(f"ferry: {host.config}: export 'b': image "), last
    assert last.endswith("b.img: no such file")
    assert "Traceback" not in refused.stderr.decode()


def test_a_listen_export_off_loopback_must_name_who_may_send_it_its_image(host: Host) -> None:
    """As for ``ferry listen``: an empty ACL admits senders from loopback only, so on any other
    address a listening export without an ``acl`` would take no migration at all."""
    for name in "ab":
        host.image(name)
    host.write([export_table("a"), export_table("b", mode="listen")], addr="0.0.0.0")
    refused = run([*FERRY, "daemon", "--config", str(host.config)], check=False)
    assert refused.returncode == 1
    assert refused.stderr.decode().splitlines()[-1] == (
        f"ferry: {host.config}: export 'b': listen on 0.0.0.0 admits migration senders only "
        "from the addresses its ACL names: name the source hosts in the export's acl, or "
        'authenticate them by certificate (tls = "require" and tls_verify_peer = true)'
    )
    assert "Traceback" not in refused.stderr.decode()
    host.write([export_table("a")], addr="0.0.0.0")
    process = daemon(host.config)
    try:
        add = [*FERRY, "export", "add", "--sock", str(host.sock), "--name", "b", "--mode", "listen"]
        add += ["--file", str(host.root / "b.img")]
        unnamed = run(add, check=False)
        assert (unnamed.returncode, unnamed.stderr.decode()) == (
            1,
            "ferry: listen on 0.0.0.0 admits migration senders only from the addresses its ACL "
            "names: name the source hosts in the export's acl, or authenticate them by "
            'certificate (tls = "require" and tls_verify_peer = true)\n',
        )
        assert set(exports(host.sock)) == {"a"}
        named = run([*add, "--acl", "192.0.2.1"])
        assert named.stdout.decode() == "export 'b' added: listening\n"
        assert exports(host.sock)["b"]["state"] == "listening"
    finally:
        assert process.stop() == 0


def test_a_daemon_over_mutual_tls_serves_and_migrates_by_certificate(
    tmp_path: Path, pki: PKI
) -> None:
    """The file's TLS keys are serve's options: every client must use TLS with a
    certificate of the CA, and x moves into the other daemon's listening export over
    mutually authenticated TLS, its sender admitted by its certificate's subject
    (``tls_allowed_subjects``), byte for byte, while y stays."""
    source_host, dest_host = Host(tmp_path, "source"), Host(tmp_path, "dest")
    locks = f"local:{tmp_path / 'locks'}"  # both daemons on one host: one lockspace
    (tmp_path / "locks").mkdir(mode=0o700)
    source_host.image("x", seed=1)
    source_host.image("y", seed=2)
    dest_host.image("x")
    (dest_host.root / "senders").write_text(f"{pki.node_subject}\n")
    tls = {
        "tls": "require",
        "tls_certificates": str(pki.node),
        "tls_verify_peer": True,
    }
    source_host.write([export_table("x"), export_table("y")], lockspace=locks, **tls)
    dest_host.write(
        [export_table("x", mode="listen")],
        lockspace=locks,
        tls_allowed_subjects="senders",  # relative: the file's directory
        **tls,
    )
    source = daemon(source_host.config)
    dest = daemon(dest_host.config)
    secure = f"nbds://127.0.0.1:{source.port}?tls-certificates={pki.node}"
    try:
        # Every client must use TLS, with a certificate of the CA.
        out = run(["nbdinfo", "--list", "--json", secure]).stdout
        assert [e["export-name"] for e in json.loads(out)["exports"]] == ["x", "y"]
        plain = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{source.port}/y"], check=False)
        assert plain.returncode != 0
        assert "server requires TLS encryption first" in plain.stderr.decode()
        without_certificate = secure.replace(str(pki.node), str(pki.ca_only))
        assert run(["nbdinfo", "--list", without_certificate], check=False).returncode != 0
        migrated = run(
            mirror_command(dest.port, source_host.sock, "--export", "x", "--wait"), timeout=120
        ).stdout.decode()
        assert migrated.rstrip().endswith("has control of the image"), migrated
        dest.wait_for_log("receiving x from")
        assert "TLS with 127.0.0.1: CN=source,O=ferry tests" in "".join(dest.log)
        wait_until("x left the source", lambda: "x" not in exports(source_host.sock))
        into = f"nbds://127.0.0.1:{dest.port}/x?tls-certificates={pki.node}"
        assert json.loads(run(["nbdinfo", "--json", into]).stdout)["TLS"] is True
    finally:
        assert dest.stop() == 0
        assert source.stop() == 0
    moved = (dest_host.root / "x.img").read_bytes()
    assert moved == (source_host.root / "x.img").read_bytes()
