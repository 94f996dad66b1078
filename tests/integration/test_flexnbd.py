"""flexnbd's migration stream against real ferry processes.

``ferry listen --oldstyle`` takes a migration from a scripted flexnbd sender
(``fakes.flexnbd.FlexnbdSender``: oldstyle hello, WRITEs with the handle
``.MIRROR.``, then DISC), and serves the image on the same port afterwards;
``ferry mirror --flexnbd`` sends the same stream from a ``ferry serve`` into
it.  Waits are on log lines and process exits, with deadlines; nothing sleeps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.flexnbd import FlexnbdSender
from ferry.nbd.constants import Errno
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    mirror_command,
    random_file,
    read_line,
    run,
    serve,
    sparse_file,
    status,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 16 * MiB
COMMITTED = re.compile(rb"committed; serving with control")
SENDER_LOST = re.compile(rb"went away before the commit: listening again")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[FerryProcess, Path, Path]]:
    target = sparse_file(tmp_path / "target.img", SIZE)
    sock = tmp_path / "target.sock"
    proc = FerryProcess(
        [
            "listen",
            "--addr",
            "127.0.0.1",
            "--port",
            "0",
            "--file",
            str(target),
            "--sock",
            str(sock),
            "--oldstyle",
            "127.0.0.1",  # flexnbd's sender cannot authenticate: the ACL names it
        ]
    ).wait_serving()
    yield proc, target, sock
    proc.stop()



def wait_for_log(proc: FerryProcess, pattern: re.Pattern[bytes]) -> None:
    deadline = Deadline()
    assert proc.proc.stderr is not None
    while True:
        line = read_line(proc.proc.stderr, deadline)
        if not line:
            raise AssertionError(f"ferry exited before {pattern.pattern!r}: {''.join(proc.log)}")
        proc.log.append(line.decode(errors="replace"))
        if pattern.search(line):
            return


def read_back(port: int, offset: int, size: int) -> bytes:
    args = ["read", "--addr", "127.0.0.1", "--port", str(port), "--from", str(offset)]
    return run([*FERRY, *args, "--size", str(size)]).stdout


def test_listen_oldstyle_takes_a_migration_from_flexnbd(
    tmp_path: Path, listener: tuple[FerryProcess, Path, Path]
) -> None:
    proc, target, sock = listener
    image = random_file(tmp_path / "source.img", SIZE, seed=5).read_bytes()
    assert status(sock)["state"] == "listening"
    with FlexnbdSender(proc.port) as sender:
        assert sender.read_hello()[0] == SIZE
        # An ordinary oldstyle client gets the hello too, but may not write.
        with FlexnbdSender(proc.port) as plain:
            plain.read_hello()
            assert plain.write(0, b"intruder", handle=b"plainold") == Errno.EPERM
        assert status(sock)["state"] == "listening"
        assert sender.write(0, image[:MiB]) == 0
        fields = status(sock)
        assert fields["state"] == "receiving" and fields["has_control"] == "false"
        sender.mirror(image)
        sender.disconnect()
    wait_for_log(proc, COMMITTED)
    fields = status(sock)
    assert fields["state"] == "serving" and fields["has_control"] == "true"
    assert target.read_bytes() == image
    # A normal client reads the image on the very port the migration came in on.
    assert read_back(proc.port, 3 * MiB, MiB) == image[3 * MiB : 4 * MiB]


def test_a_flexnbd_sender_lost_part_way_leaves_it_listening(
    listener: tuple[FerryProcess, Path, Path],
) -> None:
    proc, _, sock = listener
    with FlexnbdSender(proc.port) as sender:
        sender.read_hello()
        assert sender.write(0, b"x" * 4096) == 0
        assert status(sock)["state"] == "receiving"
    # Closed without DISC: back to listening.
    wait_for_log(proc, SENDER_LOST)
    assert status(sock)["state"] == "listening"
    with FlexnbdSender(proc.port) as again:
        assert again.read_hello()[0] == SIZE
        assert again.write(0, b"y" * 4096) == 0
        assert status(sock)["state"] == "receiving"


def test_ferry_mirror_flexnbd_into_listen_oldstyle(
    tmp_path: Path, listener: tuple[FerryProcess, Path, Path]
) -> None:
    dest, target, dest_sock = listener
    image = random_file(tmp_path / "source.img", SIZE, seed=9)
    source_sock = tmp_path / "source.sock"
    source = serve(image, "--sock", str(source_sock))
    try:
        flexnbd = ["--flexnbd", "--action", "nothing", "--wait"]
        result = run(mirror_command(dest.port, source_sock, *flexnbd))
        out = result.stdout.decode()
        assert out.startswith("Mirror started\n"), out
        assert out.rstrip().endswith("has control of the image"), out
        assert status(source_sock)["state"] == "handed_off"
        wait_for_log(dest, COMMITTED)
        assert status(dest_sock)["state"] == "serving"
        assert target.read_bytes() == image.read_bytes()
    finally:
        source.stop()
