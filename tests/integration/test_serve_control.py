"""The control socket, the CLI's error handling, metrics and traces of a real ``ferry serve``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.remote import RemoteExport
from ferry.status import parse_line
from support import FERRY, FerryProcess, nbdsh, run, serve, serve_args, sparse_file

pytestmark = pytest.mark.integration

MiB = 1 << 20


def control(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(payload)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return sparse_file(tmp_path / "disk.img", 16 * MiB, data_at=[(0, MiB)])


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


@pytest.fixture
def server(image: Path, sock: Path):  # type: ignore[no-untyped-def]
    proc = serve(image, "--sock", str(sock))
    yield proc
    assert proc.stop() == 0, proc.stderr_text()


def status_of(sock: Path) -> dict[str, str]:
    out = run([*FERRY, "status", "--sock", str(sock)]).stdout.decode()
    return parse_line(out)


def test_status_line_fields_and_values(server: FerryProcess, sock: Path) -> None:
    fields = status_of(sock)
    assert fields == {
        "pid": str(server.proc.pid),
        "size": str(16 * MiB),
        "is_mirroring": "false",
        "clients_allowed": "true",
        "num_clients": "0",
        "has_control": "true",
        "is_migrating": "false",
        "state": "serving",
        # The embedded default lockspace: serving means holding the lease.
        "lease_state": "held",
        "lease_token": fields["lease_token"],
        "address": f"127.0.0.1:{server.port}",  # where clients reach it, port 0 or not
        "can_move_connections": "true",  # root, with nftables: TCP_REPAIR works here
        "blockers": "",  # nothing keeps it from migrating
    }
    assert int(fields["lease_token"]) >= 1
    with RemoteExport.connect("127.0.0.1", server.port) as remote:
        remote.pread(0, 512)
        assert status_of(sock)["num_clients"] == "1"
    raw = control(sock, b"status\n\n").decode()
    assert raw.startswith("0: pid=") and raw.endswith("\n")


def test_control_socket_is_private(server: FerryProcess, sock: Path) -> None:
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_empty_unknown_and_bad_commands(server: FerryProcess, sock: Path) -> None:
    assert control(sock, b"\n") == b"9: missing command\n"
    assert control(sock, b"frobnicate\n\n") == b"10: unknown command\n"
    assert control(sock, b"acl\n10.0.0.0/8\nnot-an-ip\n\n") == b"1: bad spec: not-an-ip\n"
    for command in (b"mirror\n127.0.0.1\n9\n\n", b"break\n\n", b"mirror_max_bps\n100\n\n"):
        reply = control(sock, command)
        assert reply.startswith(b"1: ") and len(reply) > 10, reply
    # A half-closed client that never sent the blank line still gets its answer.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(b"status\n")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(65536).startswith(b"0: pid=")
    # The server is unharmed.
    assert status_of(sock)["state"] == "serving"


def test_json_rpc(server: FerryProcess, sock: Path) -> None:
    requests = b'{"id": 1, "method": "status"}\n{"id": 2, "method": "nope"}\nnot json\n'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(requests)
        stream = conn.makefile("rb")
        answers = [json.loads(stream.readline()) for _ in range(3)]
    assert answers[0]["id"] == 1
    assert answers[0]["result"]["state"] == "serving"
    assert answers[0]["result"]["size"] == 16 * MiB
    assert answers[1]["error"]["code"] == -32601
    assert answers[2]["error"]["code"] == -32700


def test_acl_disconnects_clients_no_longer_allowed(server: FerryProcess, sock: Path) -> None:
    remote = RemoteExport.connect("127.0.0.1", server.port)
    remote.pread(0, 512)
    run([*FERRY, "acl", "--sock", str(sock), "10.0.0.0/8", "fd00::/8"])
    with pytest.raises((OSError, ConnectionError)):
        remote.pread(0, 512)
    assert status_of(sock)["num_clients"] == "0"
    with pytest.raises((OSError, ConnectionError)):
        RemoteExport.connect("127.0.0.1", server.port).pread(0, 1)
    run([*FERRY, "acl", "--sock", str(sock), "127.0.0.1"])
    with RemoteExport.connect("127.0.0.1", server.port) as again:
        assert again.pread(0, 4) == b"\xa5" * 4


def test_default_deny_with_an_empty_acl_admits_no_one(image: Path) -> None:
    proc = serve(image, "--default-deny")
    try:
        result = run(["nbdinfo", proc.uri()], check=False)
        assert result.returncode != 0
    finally:
        assert proc.stop() == 0


def test_a_stale_socket_file_is_replaced(image: Path, sock: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # the file stays, nothing answers on it
    proc = serve(image, "--sock", str(sock))
    try:
        assert status_of(sock)["pid"] == str(proc.proc.pid)
    finally:
        assert proc.stop() == 0
    assert not sock.exists()


def test_a_live_socket_is_not_stolen(server: FerryProcess, image: Path, sock: Path) -> None:
    result = run([*FERRY, *serve_args(image, "--sock", str(sock))], check=False)
    assert result.returncode == 1
    assert (
        result.stderr.decode().strip()
        == f"ferry: control socket {sock}: in use by a running server"
    )
    assert status_of(sock)["pid"] == str(server.proc.pid)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--file", "/nonexistent/disk.img"],
            r"^ferry: image /nonexistent/disk.img: .*no such file",
        ),
        (["--file", "{image}", "300.1.2.3"], r"^ferry: bad ACL entry '300.1.2.3'"),
        (
            ["--file", "{image}", "--metrics", "127.0.0.1:{port}"],
            r"^ferry: cannot listen for metrics",
        ),
        (["--file", "{image}", "--trace", "/nonexistent/dir/t.jsonl"], r"^ferry: trace file"),
    ],
)
def test_user_errors_are_one_clear_line(
    server: FerryProcess, image: Path, args: list[str], message: str
) -> None:
    args = [a.format(image=image, port=server.port) for a in args]
    result = run([*FERRY, "serve", "--addr", "127.0.0.1", "--port", "0", *args], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err, re.IGNORECASE), err


def test_port_in_use(server: FerryProcess, image: Path) -> None:
    other = image.with_name("other.img")  # another image: its lease is free
    other.write_bytes(bytes(4096))
    result = run(
        [*FERRY, "serve", "--addr", "127.0.0.1", "--port", str(server.port), "--file", str(other)],
        check=False,
    )
    assert result.returncode == 1
    assert (
        result.stderr.decode()
        .splitlines()[-1]
        .startswith(f"ferry: cannot listen for NBD on 127.0.0.1:{server.port}")
    )


def test_bad_options_are_usage_errors() -> None:
    for args in (["serve", "--port", "x"], ["serve"], ["status"], ["frobnicate"]):
        result = run([*FERRY, *args], check=False)
        assert result.returncode == 2, args
        assert b"Traceback" not in result.stderr


def test_help_for_each_mode() -> None:
    assert b"serve" in run([*FERRY, "help"]).stdout
    assert b"--default-deny" in run([*FERRY, "help", "serve"]).stdout
    result = run([*FERRY, "help", "nope"], check=False)
    assert result.returncode == 2 and result.stderr.startswith(b"ferry help: no mode named")


def test_read_and_write_commands(server: FerryProcess) -> None:
    payload = bytes(range(256)) * 20
    run(
        [
            *FERRY,
            "write",
            "--addr",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--from",
            "12345",
            "--size",
            str(len(payload)),
        ],
        input=payload,
    )
    out = run(
        [
            *FERRY,
            "read",
            "--addr",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--from",
            "12345",
            "--size",
            str(len(payload)),
        ]
    ).stdout
    assert out == payload
    short = run(
        [
            *FERRY,
            "write",
            "--addr",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--from",
            "0",
            "--size",
            "100",
        ],
        input=b"abc",
        check=False,
    )
    assert short.returncode == 1 and b"stdin ended" in short.stderr
    past = run(
        [
            *FERRY,
            "read",
            "--addr",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--from",
            "16M",
            "--size",
            "1",
        ],
        check=False,
    )
    assert past.returncode == 1 and b"past the end" in past.stderr
    refused = run(
        [*FERRY, "read", "--addr", "127.0.0.1", "--port", "1", "--from", "0", "--size", "1"],
        check=False,
    )
    assert refused.returncode == 1 and refused.stderr.startswith(b"ferry: 127.0.0.1:1:")


def test_sigterm_finishes_requests_in_flight(image: Path) -> None:
    """Every write the server acknowledged is in the file after a SIGTERM stop."""
    proc = serve(image)
    with RemoteExport.connect("127.0.0.1", proc.port) as remote:
        sock = remote.socket  # raw pipelining below the blocking client
        blocks = 200
        for i in range(blocks):
            header = struct.pack(">IHHQQI", 0x25609513, 0, 1, i, (2 + i) * 4096, 4096)
            sock.sendall(header + bytes([i % 251 + 1]) * 4096)
        first = sock.recv(20, socket.MSG_WAITALL)
        proc.proc.send_signal(signal.SIGTERM)
        replies = first
        while chunk := sock.recv(65536):
            replies += chunk
    assert proc.proc.wait(timeout=30) == 0
    acked = []
    # Structured replies were negotiated: each success is a 20-byte NONE chunk with DONE.
    for i in range(0, len(replies) - len(replies) % 20, 20):
        magic, flags, kind, handle, length = struct.unpack(">IHHQI", replies[i : i + 20])
        assert (magic, flags, kind, length) == (0x668E33EF, 1, 0, 0)
        acked.append(handle)
    assert acked, "no write was acknowledged"
    data = image.read_bytes()
    for handle in acked:
        offset = (2 + handle) * 4096
        assert data[offset : offset + 4096] == bytes([handle % 251 + 1]) * 4096


def test_bad_magic_closes_that_connection_and_no_other(server: FerryProcess) -> None:
    good = RemoteExport.connect("127.0.0.1", server.port)
    bad = RemoteExport.connect("127.0.0.1", server.port)
    bad.socket.sendall(b"\xde\xad\xbe\xef" * 7)
    bad.socket.settimeout(10)
    try:
        closed = bad.socket.recv(1) == b""
    except ConnectionResetError:  # aborted with unread bytes in the buffer: an RST
        closed = True
    assert closed
    assert good.pread(0, 4) == b"\xa5" * 4
    good.close()
    nbdsh(server.uri(), "assert h.pread(4, 0) == b'\\xa5' * 4")


def test_metrics_cover_every_status_field_and_pass_promtool(image: Path, sock: Path) -> None:
    proc = serve(image, "--sock", str(sock), "--metrics", "127.0.0.1:0")
    try:
        url = next(m.group(1) for line in proc.log if (m := re.search(r"metrics at (\S+)", line)))
        nbdsh(proc.uri(), "h.pread(4096, 0); h.pwrite(b'x' * 512, 0); h.flush()")
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        fields = status_of(sock)
    finally:
        assert proc.stop() == 0
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    families = {family.name for family in text_string_to_metric_families(text)}
    import dataclasses

    from ferry.status import StatusSnapshot

    specs = {
        f.name: f.metadata["spec"]
        for f in dataclasses.fields(StatusSnapshot)
        if "spec" in f.metadata
    }
    for field in fields:
        spec = specs[field]
        name = {"state": "ferry_state", "info": f"ferry_{spec.metric}_info"}.get(
            spec.kind, "ferry_" + spec.metric
        )
        assert name in families, f"status field {field} has no series {name}"
    states = [
        s
        for family in text_string_to_metric_families(text)
        if family.name == "ferry_state"
        for s in family.samples
        if s.labels["machine"] == "role"
    ]
    assert {s.labels["state"]: s.value for s in states if s.value == 1} == {"serving": 1}
    assert samples["ferry_size_bytes"].value == 16 * MiB
    requests = {
        s.labels["command"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ferry_requests_total"
    }
    assert requests["READ"] >= 1 and requests["WRITE"] >= 1 and requests["FLUSH"] >= 1
    assert samples["ferry_read_bytes_total"].value >= 4096
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_trace_of_a_serve_session_replays(image: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    # Only the role machine here (no lease): lines 1 and 2 are its records.
    proc = serve(image, "--trace", str(trace), "--name", "disk", "--lockspace", "none")
    nbdsh(proc.uri(), "h.pread(512, 0)")
    assert proc.stop() == 0
    replayed = run([*FERRY, "trace", "replay", str(trace)]).stdout.decode().split()
    assert replayed == ["role", "disk", "stopped"]
    lines = trace.read_text().splitlines()
    created, first = json.loads(lines[0]), json.loads(lines[1])
    assert (created["event"], created["dest"]) == ("__created__", "starting")
    assert (first["event"], first["source"], first["dest"]) == ("serve", "starting", "serving")
    edited = dict(first, event="migrate", dest="migrating")
    lines[1] = json.dumps(edited)
    bad = tmp_path / "edited.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = run([*FERRY, "trace", "replay", str(bad)], check=False)
    assert result.returncode == 1
    assert "line 2" in result.stderr.decode()
