"""``ferry drain``: a daemon's exports moved into two others, two at a time, while clients write.

Three real daemons on one lockspace.  The source serves four exports, each
with a libnbd writer; one of them is blocked (``ferry block``).  The drain
moves the other three, alternating between the two targets, which get their
listening exports through their own control API; the blocked one is
reported and stays.  Every client writes on without an error (its
connection moves with the image), every acknowledged write is where the
image now is, and every block no one wrote is the source's byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support import (
    FERRY,
    FerryProcess,
    Writers,
    check_acked,
    daemon,
    random_file,
    run,
    sparse_file,
)
from workload import BLOCK

pytestmark = pytest.mark.integration

SIZE = 8 << 20
NAMES = "abcd"


def start_daemon(root: Path, locks: Path, names: str, seed: int) -> FerryProcess:
    root.mkdir()
    lines = [
        'addr = "127.0.0.1"',
        "port = 0",
        'sock = "ferry.sock"',
        f'lockspace = "local:{locks}"',
    ]
    for offset, name in enumerate(names):
        random_file(root / f"{name}.img", SIZE, seed=seed + offset)
        lines += ["", "[[export]]", f'name = "{name}"', f'file = "{name}.img"']
    (root / "ferry.toml").write_text("\n".join(lines) + "\n")
    return daemon(root / "ferry.toml")


def exports(sock: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(run([*FERRY, "export", "list", "--sock", str(sock), "--json"]).stdout)
    return {row["name"]: row for row in rows}


def test_drain_moves_what_it_may_two_at_a_time_and_reports_what_stays(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    source = start_daemon(tmp_path / "source", locks, NAMES, seed=30)
    one = start_daemon(tmp_path / "one", locks, "", seed=0)
    two = start_daemon(tmp_path / "two", locks, "", seed=0)
    targets = tmp_path / "targets"
    targets.mkdir()
    for name in NAMES:
        sparse_file(targets / f"{name}.img", SIZE)
    source_sock = tmp_path / "source" / "ferry.sock"
    socks = [tmp_path / side / "ferry.sock" for side in ("one", "two")]
    originals = {name: (tmp_path / "source" / f"{name}.img").read_bytes() for name in NAMES}
    try:
        run([*FERRY, "block", "--sock", str(source_sock), "--export", "d", "nightly", "backup"])
        writers = Writers(
            {name: source.uri(name) for name in NAMES}, SIZE // BLOCK, tmp_path / "stop"
        )
        try:
            drain = run(
                [
                    *FERRY,
                    "drain",
                    "--sock",
                    str(source_sock),
                    "--to",
                    str(socks[0]),
                    "--to",
                    str(socks[1]),
                    "--dir",
                    str(targets),
                    "--parallel",
                    "2",
                    "--copy-mode",
                    "write-blocking",
                ],
                timeout=300,
                check=False,
            )
        finally:
            reports = writers.stop()
        out = drain.stdout.decode()
        assert drain.returncode == 1, out + drain.stderr.decode()
        lines = out.splitlines()
        assert len(lines) == 5, out
        for name, sock in (("a", socks[0]), ("b", socks[1]), ("c", socks[0])):
            assert any(line.startswith(f"{name}: moved to {sock} (127.0.0.1:") for line in lines)
        assert "d: blocked: nightly backup; left serving here" in lines
        assert lines[-1] == (
            "drain: 3 of 4 exports moved; left serving here: d (blocked: nightly backup)"
        )

        # Where each export is now, with its lease.
        assert set(exports(source_sock)) == {"d"}
        for sock, names in ((socks[0], "ac"), (socks[1], "b")):
            rows = exports(sock)
            assert set(rows) == set(names)
            for name in names:
                assert (rows[name]["state"], rows[name]["lease"]["state"]) == ("serving", "held")
    finally:
        for process in (source, one, two):
            assert process.stop() == 0
    negotiated = source.stderr_text().count("negotiated (ferry listener, write-blocking)")
    assert negotiated == 3, source.stderr_text()

    for name in NAMES:
        report = reports[name]
        assert (report["ended"], report["error"]) == ("stopped", ""), report
        where = tmp_path / "source" if name == "d" else targets
        image = (where / f"{name}.img").read_bytes()
        check_acked(report, image)
        written = {int(o) for part in ("acked", "unanswered") for o in report[part]}
        for offset in range(0, SIZE, BLOCK):
            if offset not in written:
                assert image[offset : offset + BLOCK] == originals[name][offset : offset + BLOCK]


def test_an_export_a_target_cannot_take_stays_and_nothing_of_it_is_left_there(
    tmp_path: Path,
) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    source = start_daemon(tmp_path / "source", locks, "ab", seed=40)
    target = start_daemon(tmp_path / "target", locks, "", seed=0)
    t = tmp_path / "t"
    t.mkdir()
    sparse_file(t / "a.img", SIZE)  # no b.img: the target refuses b
    source_sock, target_sock = (
        tmp_path / "source" / "ferry.sock",
        tmp_path / "target" / "ferry.sock",
    )
    try:
        drain = run(
            [
                *FERRY,
                "drain",
                "--sock",
                str(source_sock),
                "--to",
                str(target_sock),
                "--dir",
                str(t),
            ],
            timeout=300,
            check=False,
        )
        out = drain.stdout.decode()
        assert drain.returncode == 1, out
        lines = out.splitlines()
        assert lines[0].startswith(f"a: moved to {target_sock} (127.0.0.1:"), out
        assert lines[1].startswith(f"b: {target_sock} refused it: "), out
        assert lines[1].endswith("; left serving here"), out
        assert lines[2].startswith("drain: 1 of 2 exports moved; left serving here: b ("), out
        assert set(exports(source_sock)) == {"b"}
        assert exports(source_sock)["b"]["state"] == "serving"
        assert set(exports(target_sock)) == {"a"}
    finally:
        for process in (source, target):
            assert process.stop() == 0
    moved = (t / "a.img").read_bytes()
    assert moved == (tmp_path / "source" / "a.img").read_bytes()


def test_a_drain_of_no_one_at_a_time_is_a_usage_error(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    result = run([*FERRY, "drain", "--sock", sock, "--to", sock, "--parallel", "0"], check=False)
    assert result.returncode == 2
    assert result.stderr.decode() == "ferry drain: --parallel must be 1 or more\n"
    bogus = run(
        [*FERRY, "drain", "--sock", sock, "--to", sock, "--copy-mode", "eager"], check=False
    )
    assert bogus.returncode == 2 and "argument --copy-mode: invalid choice: 'eager'" in (
        bogus.stderr.decode()
    )
    gone = run([*FERRY, "drain", "--sock", sock, "--to", sock], check=False)
    assert gone.returncode == 1
    assert gone.stderr.decode().count("\n") == 1 and sock in gone.stderr.decode()
