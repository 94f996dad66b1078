"""A live migration between two real ferry processes, under real client writes.

Three libnbd clients write a checkable pattern to the source (each block
carries its offset, its writer and a counter) while ``ferry mirror --wait``
moves 256 MiB to a ``ferry listen`` on another port of the same host.  Their
connections move with the image (TCP_REPAIR; one host, so the source closes
each socket before the destination rebuilds it): they never see an error,
and they keep writing to the destination afterwards.  The destination holds
every acknowledged write, before and after the handoff, and every block no
client wrote equals the source's; the source has handed off and takes no
more writes; both traces replay.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from support import (
    FERRY,
    FerryProcess,
    check_acked,
    mirror_command,
    nbdsh,
    random_file,
    run,
    sparse_file,
    status,
    wait_until,
)
from workload import BLOCK

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 256 * MiB
WORKLOAD = Path(__file__).resolve().parents[1] / "workload.py"



def start(mode: str, image: Path, sock: Path, trace: Path) -> FerryProcess:
    return FerryProcess(
        [
            mode,
            "--addr",
            "127.0.0.1",
            "--port",
            "0",
            "--file",
            str(image),
            "--name",
            "disk",
            "--sock",
            str(sock),
            "--trace",
            str(trace),
        ]
    ).wait_serving()


def test_live_migration_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    source_image = random_file(tmp_path / "source.img", SIZE, seed=21)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source_sock, dest_sock = tmp_path / "source.sock", tmp_path / "dest.sock"
    source_trace, dest_trace = tmp_path / "source.jsonl", tmp_path / "dest.jsonl"
    source = start("serve", source_image, source_sock, source_trace)
    dest = start("listen", dest_image, dest_sock, dest_trace)
    stop_file = tmp_path / "stop"
    clients = [
        subprocess.Popen(
            [
                "/usr/bin/python3",
                str(WORKLOAD),
                source.uri("disk"),
                str(k),
                "3",
                str(SIZE // BLOCK),
                str(stop_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(3)
    ]
    try:
        assert status(dest_sock)["state"] == "listening"
        refused = run(["nbdinfo", dest.uri("disk")], check=False)
        assert refused.returncode != 0  # no control yet: ordinary clients are refused
        mirror = run(
            mirror_command(dest.port, source_sock, "--action", "nothing", "--wait"),
            timeout=300,
        )
        out = mirror.stdout.decode()
        assert re.search(r"^completed after \d+ pass(es)?: ", out, re.M), out
        assert out.rstrip().endswith("has control of the image"), out
        # The moved clients write on, now to the destination.
        wait_until("a write after the handoff", lambda: diverged(dest_image, source_image))
    finally:
        stop_file.touch()
        reports = []
        for client in clients:
            stdout, stderr = client.communicate(timeout=60)
            assert client.returncode == 0, stderr.decode()
            reports.append(json.loads(stdout))

    source_status, dest_status = status(source_sock), status(dest_sock)
    assert source_status["state"] == "handed_off" and source_status["has_control"] == "false"
    assert dest_status["state"] == "serving" and dest_status["has_control"] == "true"
    assert source_status["num_clients"] == "0"
    # The longest stall a client saw: the moved ones were held here too (it read 0
    # once they moved, since they were never released here).
    assert int(source_status["last_downtime_ms"]) > 0, source_status
    # Every client moved with the image, on both sides' counts.
    assert source_status["can_move_connections"] == "true"
    for side in (source_status, dest_status):
        assert (side["connections_moved"], side["connections_aborted"]) == ("3", "0"), side
    for report in reports:
        assert report["ended"] == "stopped", report  # never disconnected, nothing failed

    # The destination answers real clients on the same port, same process.
    assert nbdsh(dest.uri("disk"), "print(h.get_size())").stdout.strip() == str(SIZE).encode()
    # The source never takes another write for this image.
    late = run(
        [
            *FERRY,
            "write",
            "--addr",
            "127.0.0.1",
            "--port",
            str(source.port),
            "--from",
            "0",
            "--size",
            "4",
        ],
        input=b"late",
        check=False,
    )
    assert late.returncode != 0

    assert sum(report["writes"] for report in reports) > 0
    dest_bytes = dest_image.read_bytes()
    source_bytes = source_image.read_bytes()
    written = {int(o) for r in reports for part in ("acked", "unanswered") for o in r[part]}
    for offset in range(0, SIZE, BLOCK):
        if offset not in written:
            assert dest_bytes[offset : offset + BLOCK] == source_bytes[offset : offset + BLOCK]
    for report in reports:
        check_acked(report, dest_bytes)

    for trace, final in ((source_trace, "handed_off"), (dest_trace, "serving")):
        assert proc_replay(trace) == final

    assert dest.stop() == 0
    assert source.stop() == 0
    assert proc_replay(dest_trace) == "stopped"


def diverged(dest: Path, source: Path) -> bool:
    """A block of ``dest`` differs from ``source``'s: a client wrote it after the handoff."""
    with dest.open("rb") as d, source.open("rb") as s:
        while chunk := d.read(16 * MiB):
            if chunk != s.read(len(chunk)):
                return True
    return False


def proc_replay(trace: Path) -> str:
    lines = run([*FERRY, "trace", "replay", str(trace)]).stdout.decode().splitlines()
    roles = [line.split()[2] for line in lines if line.startswith("role ")]
    assert len(roles) == 1, lines
    return roles[0]
