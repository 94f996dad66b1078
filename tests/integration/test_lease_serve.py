"""``ferry serve --lockspace``: the lease is taken before any client is served.

Real ferry processes on a real local lockspace (OFD lock files): a second
server for the same image is refused with the holder's name and serves
nothing; once the first has stopped, the next one gets a larger token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support import FERRY, FerryProcess, free_port, run, serve, status

pytestmark = pytest.mark.integration



def test_a_second_server_for_a_leased_image_is_refused_naming_the_holder(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    space = f"local:{locks}"
    first = serve(image, "--lockspace", space, "--sock", str(tmp_path / "first.sock"))
    try:
        held = status(tmp_path / "first.sock")
        assert (held["lease_state"], held["state"]) == ("held", "serving")
        token = int(held["lease_token"])
        second = run(
            [*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(image), "--lockspace", space],
            check=False,
        )
        assert second.returncode == 1
        message = second.stderr.decode().strip().splitlines()[-1]
        assert message.startswith(f"ferry: lease on {image.resolve()} is held by ")
        assert f":{first.proc.pid}:disk.img (exclusive, token {token})" in message
    finally:
        assert first.stop() == 0
    # Stopping released it, and removed its lock file: nobody holds the lease.
    assert list(locks.glob("*.lock")) == []
    # The next server takes it with a larger token all the same.
    third = serve(image, "--lockspace", space, "--sock", str(tmp_path / "third.sock"))
    try:
        assert int(status(tmp_path / "third.sock")["lease_token"]) > token
    finally:
        assert third.stop() == 0
    assert sorted(path.name for path in locks.iterdir()) == ["tokens"]


def test_a_bad_lockspace_is_one_line_and_nothing_is_served(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    for spec, words, exit_status in (
        ("nowhere:x", "unknown scheme", 2),  # the command line is wrong: a usage error
        (f"local:{tmp_path / 'missing'}", "does not exist", 1),
        # Refused after the reactor started: its shutdown must not flush a closed image.
        (f"etcd:http://127.0.0.1:{free_port()}", "no etcd endpoint answered", 1),
    ):
        result = run(
            [*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(image), "--lockspace", spec],
            check=False,
        )
        assert result.returncode == exit_status
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and words in lines[0] and lines[0].startswith("ferry")
        assert "Traceback" not in result.stderr.decode()


def test_lockspace_none_serves_without_a_lease(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    proc: FerryProcess = serve(image, "--sock", str(tmp_path / "s.sock"), "--lockspace", "none")
    try:
        assert "lease_state" not in status(tmp_path / "s.sock")
    finally:
        assert proc.stop() == 0


def test_the_default_lockspace_holds_the_lease_and_its_trace_replays(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    trace = tmp_path / "trace.jsonl"
    proc = serve(image, "--sock", str(tmp_path / "s.sock"), "--trace", str(trace))
    try:
        assert status(tmp_path / "s.sock")["lease_state"] == "held"
        # Another server for the same image, on the same defaults, is refused.
        second = run([*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(image)], check=False)
        assert second.returncode == 1 and b"is held by" in second.stderr
    finally:
        assert proc.stop() == 0
    replayed = run([*FERRY, "trace", "replay", str(trace)]).stdout.decode().splitlines()
    assert f"lease {image.resolve()} stopped" in replayed
    assert "role disk.img stopped" in replayed
