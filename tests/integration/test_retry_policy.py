"""The retry policy on real ferry processes: a full disk at the destination ends the migration.

The destination's image lies on a tmpfs of 8 MiB mounted for this test, so
its writes fail with ENOSPC part-way through the bulk pass.  Retrying cannot
heal that: the migration ends ``failed`` at once with the reason
``no_space``, which ``ferry mirror --wait`` prints, the status line shows
and the trace's ``give_up`` record carries.  The source serves on, and its
writing libnbd client never saw an error; every write it got acknowledged
is in the source's image, and every other block is the original's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import (
    FERRY,
    Writers,
    check_acked,
    mirror_command,
    random_file,
    run,
    serve,
    sparse_file,
    status,
    wait_until,
)
from workload import BLOCK

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 32 * MiB



@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 8 MiB, unmounted again whatever the test did."""
    mount = tmp_path / "small"
    mount.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=8M,mode=0700", "ops-retry-tmpfs", str(mount)])
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_destination_fails_the_migration_at_once(tmp_path: Path, small_fs: Path) -> None:
    source_image = random_file(tmp_path / "source.img", SIZE, seed=11)
    original = source_image.read_bytes()
    dest_image = sparse_file(small_fs / "dest.img", SIZE)  # 32 MiB that cannot all be written
    source_sock, dest_sock = tmp_path / "source.sock", tmp_path / "dest.sock"
    trace = tmp_path / "source.jsonl"
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    space = f"local:{locks}"
    source = serve(
        source_image,
        "--name",
        "disk",
        "--sock",
        str(source_sock),
        "--lockspace",
        space,
        "--trace",
        str(trace),
    )
    dest = serve(
        dest_image, "--name", "disk", "--sock", str(dest_sock), "--lockspace", space, mode="listen"
    )
    writers = Writers({"disk": source.uri("disk")}, 2048, tmp_path / "stop")
    report: dict[str, object] = {}
    try:
        wait_until("the writer connected", lambda: status(source_sock)["num_clients"] == "1")
        # Without a bound on retries: the error alone ends it.
        mirror = run(
            mirror_command(dest.port, source_sock, "--action", "nothing", "--wait"),
            check=False,
            timeout=300,
        )
        assert mirror.returncode == 1
        stderr = mirror.stderr.decode()
        assert "migration ended failed: no_space: " in stderr, stderr
        assert "ENOSPC" in stderr
        line = status(source_sock)
        assert (line["state"], line["has_control"], line["is_migrating"]) == (
            "serving",
            "true",
            "false",
        )
        assert line["migration_last_failure"] == "no_space"
        wait_until("the destination listening", lambda: status(dest_sock)["state"] == "listening")
        report = writers.stop()["disk"]
    finally:
        if not report:
            writers.stop()
        source.stop()
        dest.stop()
    assert report["ended"] == "stopped", report  # the client never saw an error
    image = source_image.read_bytes()
    check_acked(report, image)
    written = {int(o) for part in ("acked", "unanswered") for o in report[part]}  # type: ignore[attr-defined]
    for offset in range(0, SIZE, BLOCK):
        if offset not in written:
            assert image[offset : offset + BLOCK] == original[offset : offset + BLOCK]
    records = [json.loads(text) for text in trace.read_text().splitlines()]
    migration = [r for r in records if r["machine"] == "migration"]
    assert [r["event"] for r in migration][-2:] == ["fail", "give_up"]
    assert migration[-1]["reason"].startswith("no_space: ") and migration[-1]["dest"] == "failed"
    assert run([*FERRY, "trace", "replay", str(trace)]).returncode == 0
