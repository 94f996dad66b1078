"""A migration over ``unix:PATH`` and over ``exec:COMMAND``: the same stream, commit and lease.

Real processes: a ``ferry serve`` with a libnbd writer on it mirrors to a
``ferry listen --nbd-sock`` over its Unix socket, or to a ``ferry listen
--stdio`` it starts itself (``exec:``).  Each time the destination ends up
serving with the lease (a larger token, from a local lockspace), the
source handed off, and every acknowledged write is in the destination's
image, every other block byte for byte the source's.  A bad ``--to`` is
one line and exit 2, before anything is asked of the server.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import (
    FERRY,
    FerryProcess,
    Writers,
    check_acked,
    nbdsh,
    random_file,
    run,
    serve,
    sparse_file,
    wait_until,
)
from workload import BLOCK

pytestmark = pytest.mark.integration

SIZE = 32 << 20
RESOURCE = "vm-transports"


def status(sock: Path) -> dict[str, str]:
    line = run([*FERRY, "status", "--sock", str(sock)]).stdout.decode().split()
    return dict(field.split("=", 1) for field in line)


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    path = tmp_path / "locks"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def source(tmp_path: Path, locks: Path) -> Iterator[FerryProcess]:
    image = random_file(tmp_path / "source.img", SIZE, seed=11)
    args = ["--name", "disk", "--sock", str(tmp_path / "serve.sock")]
    args += ["--lockspace", f"local:{locks}", "--resource", RESOURCE]
    proc = serve(image, *args)
    yield proc
    proc.stop()


def listen_args(tmp_path: Path, locks: Path, *extra: str) -> list[str]:
    return [
        "listen",
        "--addr",
        "127.0.0.1",
        "--port",
        "0",
        "--file",
        str(sparse_file(tmp_path / "dest.img", SIZE)),
        "--name",
        "disk",
        "--sock",
        str(tmp_path / "listen.sock"),
        "--lockspace",
        f"local:{locks}",
        "--resource",
        RESOURCE,
        "--nbd-sock",
        str(tmp_path / "listen.nbd"),
        *extra,
    ]


def migrate_with_a_writer(tmp_path: Path, source: FerryProcess, to: str) -> None:
    """Mirror the source ``--to`` while a libnbd client writes; check lease and bytes."""
    before = status(tmp_path / "serve.sock")
    assert before["lease_state"] == "held"
    writers = Writers({"disk": source.uri("disk")}, SIZE // BLOCK, tmp_path / "stop")
    try:
        wait_until("a first write", lambda: status(tmp_path / "serve.sock")["num_clients"] == "1")
        mirror = run(
            [
                *FERRY,
                "mirror",
                "--to",
                to,
                "--sock",
                str(tmp_path / "serve.sock"),
                "--action",
                "nothing",
                "--wait",
            ],
            timeout=300,
        )
    finally:
        reports = writers.stop()
    out = mirror.stdout.decode()
    assert out.rstrip().endswith(f"{to} has control of the image"), out
    after, dest = status(tmp_path / "serve.sock"), status(tmp_path / "listen.sock")
    assert (after["state"], after["lease_state"]) == ("handed_off", "released")
    assert (dest["state"], dest["lease_state"]) == ("serving", "held")
    assert int(dest["lease_token"]) > int(before["lease_token"])

    report = reports["disk"]
    assert report["writes"] > 0
    dest_bytes = (tmp_path / "dest.img").read_bytes()
    source_bytes = (tmp_path / "source.img").read_bytes()
    check_acked(report, dest_bytes)
    written = {int(o) for part in ("acked", "unanswered") for o in report[part]}
    for offset in range(0, SIZE, BLOCK):
        if offset not in written:
            assert dest_bytes[offset : offset + BLOCK] == source_bytes[offset : offset + BLOCK]
    # The destination serves real clients, here on its Unix socket.
    uri = f"nbd+unix:///disk?socket={tmp_path / 'listen.nbd'}"
    assert nbdsh(uri, "print(h.get_size())").stdout.strip() == str(SIZE).encode()


def test_a_migration_over_a_unix_socket(tmp_path: Path, locks: Path, source: FerryProcess) -> None:
    dest = FerryProcess(listen_args(tmp_path, locks)).wait_serving()
    try:
        assert status(tmp_path / "listen.sock")["lease_state"] == "incoming"
        migrate_with_a_writer(tmp_path, source, f"unix:{tmp_path / 'listen.nbd'}")
    finally:
        assert dest.stop() == 0


def test_a_migration_over_a_commands_stdin_and_stdout(
    tmp_path: Path, locks: Path, source: FerryProcess
) -> None:
    pid_file = tmp_path / "listener.pid"
    listener = shlex.join([*FERRY, *listen_args(tmp_path, locks, "--stdio")])
    # sh only writes down the listener's pid (to stop it at the end), then becomes it.
    command = shlex.join(["sh", "-c", f"echo $$ > {shlex.quote(str(pid_file))}; exec {listener}"])
    try:
        migrate_with_a_writer(tmp_path, source, f"exec:{command}")
        # The stream is over, the listener serves on.
        pid = int(pid_file.read_text())
        assert status(tmp_path / "listen.sock")["state"] == "serving"
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            wait_until("the listener's exit", lambda: not _running(pid))


def test_a_stdio_listener_whose_stdin_closes_early_exits_1(tmp_path: Path, locks: Path) -> None:
    result = run([*FERRY, *listen_args(tmp_path, locks, "--stdio")], input=b"", check=False)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1] == (
        "ferry: the migration over stdin and stdout ended before it completed"
    )
    # stdout is the stream's: NBD's greeting at most (it may not have gone out), never a log.
    assert b"NBDMAGIC".startswith(result.stdout[:8])


@pytest.mark.parametrize(
    ("to", "message"),
    [
        (
            "ftp:host",
            "bad destination 'ftp:host': expected tcp:HOST:PORT, unix:PATH or exec:COMMAND",
        ),
        ("unix:", "bad destination 'unix:': unix: needs a socket path"),
        ("exec:", "bad destination 'exec:': exec: needs a command"),
        ("exec:ssh 'host", 'bad destination "exec:ssh \'host": No closing quotation'),
        ("tcp:host:0", "bad destination 'tcp:host:0': tcp: needs HOST:PORT, PORT in 1..65535"),
    ],
)
def test_a_bad_transport_is_one_line_and_exit_2(tmp_path: Path, to: str, message: str) -> None:
    result = run([*FERRY, "mirror", "--to", to, "--sock", str(tmp_path / "none.sock")], check=False)
    assert result.returncode == 2
    assert result.stderr.decode() == f"ferry mirror: --to: {message}\n"


def test_a_unix_destination_behind_someone_elses_symlink_is_refused(
    tmp_path: Path, locks: Path, source: FerryProcess
) -> None:
    dest = FerryProcess(listen_args(tmp_path, locks)).wait_serving()
    try:
        link = tmp_path / "link.nbd"
        link.symlink_to(tmp_path / "listen.nbd")
        os.lchown(link, 65534, 65534)
        refused = run(
            [*FERRY, "mirror", "--to", f"unix:{link}", "--sock", str(tmp_path / "serve.sock")],
            check=False,
        )
        assert refused.returncode == 1
        assert refused.stderr.decode() == (
            f"ferry: Mirror failed to connect: cannot connect: unix:{link} is a symbolic link "
            "of uid 65534's: refusing to follow it\n"
        )
        assert status(tmp_path / "serve.sock")["state"] == "serving"
        assert status(tmp_path / "listen.sock")["state"] == "listening"
    finally:
        assert dest.stop() == 0


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
