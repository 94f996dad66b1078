"""Migration blockers on real ferry processes: set by hand, and found in the lockspace.

A blocked export refuses ``mirror`` with the reason, and its status line
lists it; unblocked, the same export migrates under a writing libnbd
client and the destination holds every acknowledged write.  A read-only
export whose lease a ``ferry lock run --shared`` backup shares is blocked
with that reason, without anyone saying so, until the backup ends.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ferry.control.client import line_command
from ferry.status import parse_list
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    Writers,
    check_acked,
    mirror_command,
    nbdsh,
    random_file,
    run,
    serve,
    sparse_file,
    start_peer,
    status,
    stop_peer,
    wait_until,
)
from workload import BLOCK

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 32 * MiB



@pytest.fixture
def locks(tmp_path: Path) -> Path:
    directory = tmp_path / "locks"
    directory.mkdir(mode=0o700)
    return directory


def test_a_blocked_export_refuses_mirror_and_migrates_once_unblocked(
    tmp_path: Path, locks: Path
) -> None:
    source_image = random_file(tmp_path / "source.img", SIZE, seed=5)
    original = source_image.read_bytes()
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source_sock, dest_sock = tmp_path / "source.sock", tmp_path / "dest.sock"
    space = f"local:{locks}"
    source = serve(source_image, "--name", "disk", "--sock", str(source_sock), "--lockspace", space)
    dest = serve(
        dest_image,
        "--name",
        "disk",
        "--sock",
        str(dest_sock),
        "--lockspace",
        space,
        mode="listen",
    )
    writers: Writers | None = None
    try:
        blocked = run([*FERRY, "block", "--sock", str(source_sock), "backup", "running"])
        assert blocked.stdout.decode() == "blocked: backup running\n"
        run([*FERRY, "block", "--sock", str(source_sock), "maintenance=window"])
        line = status(source_sock)
        assert parse_list(line["blockers"]) == ["backup running", "maintenance=window"]
        # flexnbd's line form, as its tooling sends it: refused with the reasons.
        answer = line_command(str(source_sock), ["mirror", "127.0.0.1", str(dest.port)])
        assert answer == (1, "migration blocked: backup running; maintenance=window")
        refused = run(mirror_command(dest.port, source_sock, "--wait"), check=False)
        assert refused.returncode == 1
        assert "migration blocked: backup running" in refused.stderr.decode()
        assert status(source_sock)["is_migrating"] == "false"
        assert status(dest_sock)["state"] == "listening"  # nothing was connected

        # Bad reasons are refused and change nothing.
        empty = run([*FERRY, "block", "--sock", str(source_sock), " "], check=False)
        assert empty.returncode == 1 and "a blocker needs a reason" in empty.stderr.decode()
        missing = run([*FERRY, "unblock", "--sock", str(source_sock), "no such"], check=False)
        assert missing.returncode == 1 and "not blocked: no such" in missing.stderr.decode()

        unblocked = run([*FERRY, "unblock", "--sock", str(source_sock), "backup", "running"])
        assert unblocked.stdout.decode() == (
            "unblocked: backup running\nblocked: maintenance=window\n"
        )
        run([*FERRY, "unblock", "--sock", str(source_sock)])  # every one left
        assert status(source_sock)["blockers"] == ""

        writers = Writers({"disk": source.uri("disk")}, 2048, tmp_path / "stop")
        wait_until("the writer connected", lambda: status(source_sock)["num_clients"] == "1")
        migrated = run(
            mirror_command(dest.port, source_sock, "--action", "nothing", "--wait"), timeout=300
        )
        assert migrated.stdout.decode().rstrip().endswith("has control of the image")
    finally:
        reports = writers.stop() if writers is not None else {}
        source.stop()
        dest.stop()
    report = reports["disk"]
    image = dest_image.read_bytes()
    check_acked(report, image)
    written = {int(o) for part in ("acked", "unanswered") for o in report[part]}
    for offset in range(0, SIZE, BLOCK):
        if offset not in written:
            assert image[offset : offset + BLOCK] == original[offset : offset + BLOCK]


def test_a_shared_lease_blocks_the_migration_of_a_read_only_export(
    tmp_path: Path, locks: Path
) -> None:
    image = random_file(tmp_path / "disk.img", SIZE, seed=9)
    sock = tmp_path / "ro.sock"
    space = f"local:{locks}"
    source = serve(
        image, "--read-only", "--name", "disk", "--sock", str(sock), "--lockspace", space
    )
    plain, plain_port = start_peer(
        lambda port: ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", str(SIZE)],
        tmp_path / "nbdkit.log",
    )
    # A backup holding the image's lease shared until told to stop.
    backup = subprocess.Popen(
        [
            *FERRY,
            "lock",
            "run",
            "--lockspace",
            space,
            "--resource",
            os.path.realpath(image),
            "--shared",
            "--owner",
            "backup-job",
            "--",
            "/usr/bin/python3",
            "-c",
            "import sys; print('holding', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert backup.stdout is not None and backup.stdout.readline() == b"holding\n"
        reason = "the lease on the image is shared with backup-job (shared)"
        answer = line_command(str(sock), ["mirror", "127.0.0.1", str(plain_port), "nothing"])
        assert answer == (1, f"migration blocked: {reason}")
        assert parse_list(status(sock)["blockers"]) == [reason]

        assert backup.stdin is not None
        backup.stdin.close()  # the backup ends, and with it the shared lease
        assert backup.wait(timeout=30) == 0
        migrated = run(
            mirror_command(plain_port, sock, "--action", "nothing", "--wait"), timeout=300
        )
        assert "holds a flushed copy" in migrated.stdout.decode()
        copied = nbdsh(
            f"nbd://127.0.0.1:{plain_port}",
            "import sys; sys.stdout.buffer.write(h.pread(h.get_size(), 0))",
        ).stdout
        assert copied == image.read_bytes()
        deadline = Deadline()
        wait_until("the blocker gone from status", lambda: status(sock)["blockers"] == "", deadline)
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.wait()
        stop_peer(plain)
        source.stop()


def test_blockers_over_json_name_the_export(tmp_path: Path, locks: Path) -> None:
    image = sparse_file(tmp_path / "disk.img", SIZE)
    sock = tmp_path / "s.sock"
    process: FerryProcess = serve(
        image, "--name", "disk", "--sock", str(sock), "--lockspace", "none"
    )
    try:
        result = run([*FERRY, "block", "--sock", str(sock), "--export", "disk", "hold"])
        assert result.stdout.decode() == "blocked: hold\n"
        as_json = json.loads(run([*FERRY, "status", "--sock", str(sock), "--json"]).stdout)
        assert as_json["blockers"] == ["hold"]
        other = run([*FERRY, "block", "--sock", str(sock), "--export", "nope", "x"], check=False)
        assert other.returncode == 1 and "no export named 'nope'" in other.stderr.decode()
    finally:
        process.stop()
