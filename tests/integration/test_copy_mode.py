"""``ferry mirror --copy-mode``: a writer faster than the migration's link, in both modes.

A libnbd client (``workload.py``, 8 writes in flight, every block of the
image in turn at random) writes a checkable pattern to a ``ferry serve``
while ``ferry mirror --max-bps`` moves its image to a ``ferry listen`` over
a link slower than the writer.  In the background mode the passes cannot
catch up: the migration ends only because auto-converge throttles the
writer (the source logs it).  In the write-blocking mode a write to what
the migration has copied is answered once the destination has it, so the
dirty set only shrinks and the migration completes unthrottled, having
mirrored client writes (``ferry_mirrored_writes_total``).  In both, every
write the client had acknowledged is on the destination, byte for byte.

A mirrored write whose destination dies under it is not lost and does not
hang: its client is answered (it is on the source), the attempt is lost,
and the source still holds every acknowledged write.  And a bad copy mode
is refused with one clear line, by the command line and the control socket.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from support import (
    FERRY,
    FerryProcess,
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
SIZE = 16 * MiB
#: The migration's link: the writer below goes faster than this.
LINK = "4M"
WORKLOAD = Path(__file__).resolve().parents[1] / "workload.py"


def start(mode: str, image: Path, sock: Path) -> FerryProcess:
    """``ferry serve`` or ``listen`` of ``image`` as the export ``disk``, with /metrics."""
    return serve(
        image, "--name", "disk", "--sock", str(sock), "--metrics", "127.0.0.1:0", mode=mode
    )


def pair(tmp_path: Path, seed: int) -> tuple[FerryProcess, Path, FerryProcess, Path]:
    """A source serving a random image and a destination listening for it: each's image."""
    source_image = random_file(tmp_path / "source.img", SIZE, seed=seed)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source = start("serve", source_image, tmp_path / "source.sock")
    dest = start("listen", dest_image, tmp_path / "dest.sock")
    return source, source_image, dest, dest_image


def writer(uri: str, stop_file: Path) -> subprocess.Popen[bytes]:
    """The workload over every block of the image, 8 writes in flight."""
    return subprocess.Popen(
        ["/usr/bin/python3", str(WORKLOAD), uri, "0", "1", str(SIZE // BLOCK), str(stop_file), "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def report_of(client: subprocess.Popen[bytes]) -> dict[str, object]:
    stdout, stderr = client.communicate(timeout=120)
    assert client.returncode == 0, stderr.decode()
    report: dict[str, object] = json.loads(stdout)
    return report


def metric(process: FerryProcess, name: str) -> float:
    """The value of the sample ``name{export="disk"}`` on ``process``'s /metrics."""
    text = urllib.request.urlopen(process.metrics_url(), timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{export="disk"}} '):
            return float(line.split()[-1])
    raise LookupError(f"no {name} in {text}")


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_a_writer_faster_than_the_link(tmp_path: Path, mode: str) -> None:
    source, _, dest, dest_image = pair(tmp_path, seed=5)
    source_sock, dest_sock = tmp_path / "source.sock", tmp_path / "dest.sock"
    stop_file = tmp_path / "stop"
    client = writer(source.uri("disk"), stop_file)
    try:
        # The writer is under way before the migration starts.
        wait_until("a first write", lambda: metric(source, "ferry_written_bytes_total") > 0)
        mirror = run(
            mirror_command(
                dest.port,
                source_sock,
                "--max-bps",
                LINK,
                "--max-downtime",
                "0.05",
                "--max-passes",
                "3",
                "--copy-mode",
                mode,
                "--action",
                "nothing",
                "--wait",
            ),
            timeout=300,
        )
        out = mirror.stdout.decode()
        assert out.rstrip().endswith("has control of the image"), out
        assert status(source_sock)["copy_mode"] == mode
        assert status(dest_sock)["state"] == "serving"
    finally:
        stop_file.touch()
        report = report_of(client)
    assert report["ended"] == "stopped", report  # the connection moved; nothing failed
    mirrored = metric(source, "ferry_mirrored_writes_total")
    assert source.stop() == 0
    log = source.stderr_text()
    throttled = "throttle writes" in log
    if mode == "background":
        assert throttled, log  # only auto-converge got it to the end
        assert mirrored == 0
    else:
        assert not throttled, log
        assert mirrored > 0
    dest_bytes = dest_image.read_bytes()
    check_acked(report, dest_bytes)
    assert dest.stop() == 0


def test_a_destination_that_dies_under_mirrored_writes(tmp_path: Path) -> None:
    source, source_image, dest, _ = pair(tmp_path, seed=6)
    source_sock = tmp_path / "source.sock"
    stop_file = tmp_path / "stop"
    client = writer(source.uri("disk"), stop_file)
    try:
        started = run(
            mirror_command(
                dest.port,
                source_sock,
                "--max-bps",
                LINK,
                "--copy-mode",
                "write-blocking",
                "--action",
                "nothing",
            )
        )
        assert started.stdout.decode().strip() == "Mirror started"
        wait_until("mirrored writes", lambda: metric(source, "ferry_mirrored_writes_total") > 20)
        dest.proc.send_signal(signal.SIGKILL)  # with mirrored writes on the wire, as likely as not
        dest.proc.wait(timeout=30)
        # The source loses the attempt and retries; its clients write on.
        wait_until("the lost attempt", lambda: last_failure(source_sock) == "connection_lost")
        written = metric(source, "ferry_written_bytes_total")
        wait_until(
            "writes after the loss",
            lambda: metric(source, "ferry_written_bytes_total") > written + 100 * BLOCK,
        )
        broke = run([*FERRY, "break", "--sock", str(source_sock)], check=False)
        assert broke.returncode == 0, broke
    finally:
        stop_file.touch()
        report = report_of(client)
    assert report["ended"] == "stopped", report  # no write failed or hung
    after = status(source_sock)
    assert after["state"] == "serving" and after["has_control"] == "true"
    check_acked(report, source_image.read_bytes())
    assert source.stop() == 0


def last_failure(sock: Path) -> object:
    """Why the source's last migration attempt failed (None: none has)."""
    from ferry.control.client import JsonControl

    with JsonControl(str(sock)) as control:
        return control.call("migration")["result"]["last_failure"]


@pytest.mark.parametrize(
    "how", ["cli", "control"], ids=["ferry mirror --copy-mode", "the mirror command's param"]
)
def test_a_bad_copy_mode_is_refused(tmp_path: Path, how: str) -> None:
    image = sparse_file(tmp_path / "disk.img", MiB)
    sock = tmp_path / "source.sock"
    source = start("serve", image, sock)
    if how == "cli":
        refused = run(mirror_command(1, sock, "--copy-mode", "bogus"), check=False)
        assert refused.returncode == 2
        assert "--copy-mode: invalid choice: 'bogus'" in refused.stderr.decode()
    else:
        from ferry.control.client import JsonControl

        with JsonControl(str(sock)) as control:
            answer = control.call("mirror", {"args": ["127.0.0.1", "1"], "copy_mode": "bogus"})
        assert answer["error"]["message"] == (
            "bad copy_mode: must be 'background' or 'write-blocking'"
        )
    assert status(sock)["is_migrating"] == "false"  # nothing started
    assert source.stop() == 0
