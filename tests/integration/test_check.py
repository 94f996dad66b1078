"""``ferry check`` on this host, and with a capability taken away.

Taken away for real: a ramfs (no hole punching, no holes to seek) mounted
for the test, an etcd endpoint nobody listens on, and CAP_NET_ADMIN dropped
from the bounding set (``setpriv``) so that TCP_REPAIR and nftables refuse.
A missing capability makes the exit status 1 only when the options given
need it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import FERRY, free_port, run, sparse_file

pytestmark = pytest.mark.integration


def check(*args: str, prefix: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    result = run([*prefix, *FERRY, "check", *args], check=False)
    return result.returncode, result.stdout.decode().splitlines()


def line(lines: list[str], name: str) -> str:
    (found,) = [text for text in lines if name in text]
    return found


def test_this_host_has_everything(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    image = sparse_file(tmp_path / "disk.img", 1 << 24)
    code, lines = check("--file", str(image), "--lockspace", f"local:{locks}", "--move-connections")
    assert code == 0, lines
    assert len(lines) == 8 and all(text.startswith("ok ") for text in lines), lines
    assert "a lease taken and released" in line(lines, "lockspace")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ferry-check-")]


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "ramfs"
    mount.mkdir()
    run(["mount", "-t", "ramfs", "ops-check-ramfs", str(mount)])
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_file_system_without_holes_is_missing_what_it_disables(ramfs: Path) -> None:
    image = sparse_file(ramfs / "disk.img", 1 << 24)
    code, lines = check("--file", str(image))
    assert code == 1, lines
    punch = line(lines, "hole punching")
    assert punch.startswith("missing") and "Operation not supported" in punch
    assert "disables TRIM and WRITE_ZEROES by deallocation" in punch and "[needed]" in punch
    assert line(lines, "SEEK_DATA").startswith("missing")
    assert line(lines, "fdatasync").startswith("ok")
    assert line(lines, "the image").startswith("ok")


def test_an_unreachable_etcd_is_missing(tmp_path: Path) -> None:
    code, lines = check("--lockspace", f"etcd:http://127.0.0.1:{free_port()}")
    assert code == 1, lines
    etcd = line(lines, "lockspace etcd:")
    assert etcd.startswith("missing") and "refused" in etcd and "[needed]" in etcd


def test_without_cap_net_admin_connections_cannot_move() -> None:
    drop = ("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin")
    code, lines = check("--move-connections", prefix=drop)
    assert code == 1, lines
    repair = line(lines, "TCP_REPAIR")
    assert repair.startswith("missing") and "CAP_NET_ADMIN" in repair
    assert "disables moving client connections" in repair
    assert line(lines, "nftables").startswith("missing")
    # Not asked for: reported all the same, and the exit status is 0.
    code, lines = check(prefix=drop)
    assert code == 0 and line(lines, "TCP_REPAIR").startswith("missing")


def test_a_missing_image_is_missing(tmp_path: Path) -> None:
    code, lines = check("--file", str(tmp_path / "nope.img"))
    assert code == 1 and line(lines, "the image").endswith(
        "no such file; disables serving it [needed]"
    )
