"""``ferry mirror``, ``break`` and ``mirror-max-bps`` against a real ``ferry serve``.

The destinations here are plain NBD servers (qemu-nbd), which ferry mirrors
into with the action ``nothing``: a consistent, flushed copy while clients
keep writing. Ferry-to-ferry handoff is tested with ``ferry listen``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.status import parse_line
from support import (
    FERRY,
    FerryProcess,
    free_port,
    mirror_command,
    random_file,
    run,
    serve,
    sparse_file,
    start_peer,
    stop_peer,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[FerryProcess, Path, Path]]:
    image = random_file(tmp_path / "source.img", 32 * MiB, seed=11)
    sock = tmp_path / "source.sock"
    proc = serve(image, "--sock", str(sock))
    yield proc, image, sock
    proc.stop()


@pytest.fixture
def qemu_target(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    target = sparse_file(tmp_path / "target.img", 32 * MiB)
    proc, port = start_peer(
        lambda port: [
            "qemu-nbd",
            "-f",
            "raw",
            "-t",
            "-x",
            "",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            str(target),
        ],
        target.with_suffix(".log"),
    )
    try:
        yield port, target
    finally:
        stop_peer(proc)


def control(sock: Path, *lines: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        conn.sendall(("".join(f"{line}\n" for line in lines) + "\n").encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_mirror_into_qemu_nbd_with_progress(
    source: tuple[FerryProcess, Path, Path], qemu_target: tuple[int, Path]
) -> None:
    _, image, sock = source
    port, target = qemu_target
    result = run(
        [
            *mirror_command(port, sock),
            "--action",
            "nothing",
            "--wait",
        ],
        timeout=120,
    )
    out = result.stdout.decode()
    assert out.startswith("Mirror started\n"), out
    assert re.search(r"^completed after \d+ pass(es)?: 32 MiB in [0-9.]+ s \(", out, re.M), out
    assert out.rstrip().endswith("holds a flushed copy")
    assert target.read_bytes() == image.read_bytes()
    fields = parse_line(run([*FERRY, "status", "--sock", str(sock)]).stdout.decode())
    assert fields["state"] == "serving" and fields["has_control"] == "true"
    assert fields["is_migrating"] == "false"


def test_mirror_command_errors_use_flexnbd_words(
    source: tuple[FerryProcess, Path, Path],
) -> None:
    _, _, sock = source
    closed = free_port()
    cases = {
        ("mirror",): b"1: mirror takes at least two parameters\n",
        ("mirror", "not-an-ip", "1"): b"1: bad IP address\n",
        ("mirror", "127.0.0.1", "99999"): b"1: bad IP port number\n",
        (
            "mirror",
            "127.0.0.1",
            "1",
            "explode",
        ): b"1: action must be 'exit', 'unlink' or 'nothing'\n",
        ("mirror", "127.0.0.1", "1", "exit", "nowhere"): b"1: bad bind address\n",
        (
            "mirror",
            "127.0.0.1",
            "1",
            "exit",
            "127.0.0.1",
            "fast",
        ): b"1: max_bps couldn't be parsed\n",
        (
            "mirror",
            "127.0.0.1",
            "1",
            "exit",
            "127.0.0.1",
            "1",
            "x",
        ): b"1: unrecognised parameters to mirror\n",
        ("mirror", "127.0.0.1", str(closed), "nothing"): (
            b"1: Mirror failed to connect: Connection was refused by other side: "
            b"111: Connection refused.\n"
        ),
        ("break",): b"1: not mirroring\n",
        ("mirror_max_bps", "1000"): b"1: Not currently mirroring\n",
    }
    for lines, expected in cases.items():
        assert control(sock, *lines) == expected, lines
    fields = parse_line(run([*FERRY, "status", "--sock", str(sock)]).stdout.decode())
    assert fields["state"] == "serving"


def test_limit_change_and_break_while_mirroring(
    source: tuple[FerryProcess, Path, Path], qemu_target: tuple[int, Path]
) -> None:
    _, _, sock = source
    port, _ = qemu_target
    assert control(sock, "mirror", "127.0.0.1", str(port), "nothing", "127.0.0.1", "1048576") == (
        b"0: Mirror started\n"
    )
    assert control(sock, "mirror", "127.0.0.1", str(port), "nothing") == (
        b"1: mirror already running\n"
    )
    fields = parse_line(control(sock, "status").decode()[3:])
    assert fields["is_migrating"] == "true" and fields["is_mirroring"] == "true"
    assert fields["state"] == "migrating", fields
    assert fields.get("migration_speed_limit") == "1048576", sorted(fields.items())
    assert control(sock, "mirror_max_bps", "2097152") == b"0: updated\n"
    assert control(sock, "mirror_max_bps", "2", "3") == b"1: Bad format\n"
    fields = parse_line(control(sock, "status").decode()[3:])
    assert fields["migration_speed_limit"] == "2097152"
    out = run([*FERRY, "break", "--sock", str(sock)]).stdout
    assert out == b"mirror stopped\n"
    fields = parse_line(control(sock, "status").decode()[3:])
    assert fields["state"] == "serving" and fields["is_migrating"] == "false"
    assert control(sock, "break") == b"1: not mirroring\n"
