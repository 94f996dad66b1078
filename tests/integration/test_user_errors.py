"""Every user error is one line on stderr and nothing before it: exit 2 for the command
line, 1 for the world.  Each case is one a new user met (issue 14), run as they ran it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry import __version__
from support import FERRY, FerryProcess, run, serve, sparse_file

pytestmark = pytest.mark.integration

MiB = 1 << 20


def one_line(result: subprocess.CompletedProcess[bytes], status: int, line: str) -> None:
    """The command failed with ``status`` and said exactly ``line`` on stderr, nothing else."""
    assert (result.returncode, result.stderr.decode(), result.stdout) == (status, line + "\n", b"")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return sparse_file(tmp_path / "disk.img", 16 * MiB)


def test_the_version() -> None:
    for command in (["version"], ["--version"]):
        assert run([*FERRY, *command]).stdout.decode() == f"ferry {__version__}\n"


def test_usage_errors_exit_2_with_one_line(image: Path) -> None:
    modes = (
        "serve, listen, mirror, proxy, break, block, unblock, mirror-max-bps, status, events, "
        "acl, read, write, trace, check, lock, daemon, export, reload, drain, statecharts, help"
    )
    one_line(
        run([*FERRY, "help", "nosuch"], check=False),
        2,
        f"ferry help: no mode named 'nosuch' (modes: version, {modes})",
    )
    nosuch = run([*FERRY, "nosuch"], check=False)
    assert nosuch.returncode == 2
    assert nosuch.stderr.decode().startswith("ferry: argument MODE: invalid choice: 'nosuch'")
    one_line(
        run(
            [
                *FERRY,
                "serve",
                "-l",
                "127.0.0.1",
                "-p",
                "0",
                "-f",
                str(image),
                "--lockspace",
                "bogus",
            ],
            check=False,
        ),
        2,
        "ferry serve: argument --lockspace: lockspace 'bogus' has no scheme: expected local:DIR "
        "or etcd:http[s]://HOST:PORT[,HOST:PORT...][?OPTION=VALUE&...]",
    )


def test_a_port_in_use_is_said_before_anything_is_taken(image: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        locks = tmp_path / "locks"
        locks.mkdir(mode=0o700)
        args = ["-l", "127.0.0.1", "-p", str(port), "-f", str(image), "--lockspace"]
        one_line(
            run([*FERRY, "serve", *args, f"local:{locks}"], check=False),
            1,
            f"ferry: cannot listen for NBD on 127.0.0.1:{port}: Address already in use",
        )
    assert list(locks.iterdir()) == []  # no lease was taken, not even for a moment


def test_an_unreachable_etcd_is_one_line(image: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = run(
        [
            *FERRY,
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            str(image),
            "--lockspace",
            f"etcd:http://127.0.0.1:{port}",
        ],
        check=False,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ferry: cannot take the lease on {image}")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Not even root may open it for writing (EPERM), as a file on a read-only disk."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_image_that_cannot_be_written_names_read_only(image: Path) -> None:
    with immutable(image):
        args = ["-l", "127.0.0.1", "-p", "0", "-f", str(image), "--lockspace", "none"]
        one_line(
            run([*FERRY, "serve", *args], check=False),
            1,
            f"ferry: image {image}: permission denied: to serve it without writing, "
            "use --read-only",
        )
        proc = serve(image, "--lockspace", "none", "--read-only")
        proc.stop()


def test_a_file_without_write_permission_is_served_writable_only_with_a_word(
    image: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may write a file that has no write permission")
    image.chmod(0o444)
    proc = serve(image, "--lockspace", "none")
    try:
        assert "has no write permission (mode 0444)" in "".join(proc.log)
    finally:
        proc.stop()


def test_status_of_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    regular = tmp_path / "not-a-socket"
    regular.write_text("")
    one_line(
        run([*FERRY, "status", "--sock", str(regular)], check=False),
        1,
        f"ferry: control socket {regular}: not a socket (is --sock the right path?)",
    )


@pytest.fixture
def server(image: Path, tmp_path: Path) -> Iterator[tuple[FerryProcess, Path]]:
    sock = tmp_path / "ctl.sock"
    proc = serve(image, "--lockspace", "none", "--sock", str(sock))
    yield proc, sock
    proc.stop()


def test_break_without_a_migration_is_an_error(server: tuple[FerryProcess, Path]) -> None:
    _, sock = server
    one_line(run([*FERRY, "break", "--sock", str(sock)], check=False), 1, "ferry: not mirroring")


def test_status_json_is_typed_and_says_where_clients_connect(
    server: tuple[FerryProcess, Path],
) -> None:
    proc, sock = server
    status = json.loads(run([*FERRY, "status", "--sock", str(sock), "--json"]).stdout)
    assert status["pid"] == proc.proc.pid and status["size"] == 16 * MiB
    assert status["has_control"] is True and status["is_mirroring"] is False
    assert status["address"] == f"127.0.0.1:{proc.port}"
    line = run([*FERRY, "status", "--sock", str(sock)]).stdout.decode()
    assert f"address=127.0.0.1:{proc.port}" in line


def test_normal_runs_say_nothing_about_twisted(server: tuple[FerryProcess, Path]) -> None:
    proc, _ = server
    assert proc.stop() == 0
    stderr = proc.stderr_text()
    assert "Starting factory" not in stderr and "starting on" not in stderr, stderr
