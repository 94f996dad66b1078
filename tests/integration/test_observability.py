"""Live events, trace timelines and JSON logs, on a real migration between two ferry processes.

One module-wide migration: a ``ferry serve`` (with ``--trace`` and ``--log``)
moves its image to a ``ferry listen`` with ``ferry mirror --wait``, while two
``ferry events`` watch the source from before it starts -- one printing the
machines' current states first, one only what happens.  The tests then hold
the events against the source's trace file, the copy against the original
byte for byte, ``ferry trace show`` against both traces, and the JSON log
against the trace.  The rest are the bad inputs, each one line and an exit
status.  Every wait is on a line from a process, with a deadline.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.trace import CREATED, TraceRecord
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    mirror_command,
    random_file,
    read_line,
    run,
    serve,
    serve_args,
    sha256,
    sparse_file,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 32 * MiB
SVG = "{http://www.w3.org/2000/svg}"


def start(mode: str, image: Path, sock: Path, *extra: str) -> FerryProcess:
    return serve(image, "--name", "disk", "--sock", str(sock), *extra, mode=mode)


def follow(sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``ferry events``, once it says it is subscribed."""
    proc = subprocess.Popen(
        [*FERRY, "events", "--sock", str(sock), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = read_line(proc.stderr, Deadline())
    assert line == f"ferry events: following {sock}\n".encode(), line
    return proc


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, list[str], str]:
    stdout, stderr = proc.communicate(timeout=30)
    return proc.returncode, stdout.decode().splitlines(), stderr.decode()


@dataclass
class Migration:
    tmp: Path
    source_image: Path
    dest_image: Path
    source_trace: Path
    dest_trace: Path
    source_log: Path
    events: list[str]  # ferry events: current states, then what happened
    live: list[str]  # ferry events --no-current
    events_stderr: str
    mirror_out: str


@pytest.fixture(scope="module")
def migration(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Migration]:
    tmp = tmp_path_factory.mktemp("observed")
    source_image = random_file(tmp / "source.img", SIZE, seed=51)
    dest_image = sparse_file(tmp / "dest.img", SIZE)
    source_trace, dest_trace = tmp / "source.jsonl", tmp / "dest.jsonl"
    source_log = tmp / "source.log.json"
    source_sock, dest_sock = tmp / "source.sock", tmp / "dest.sock"
    source = start(
        "serve", source_image, source_sock, "--trace", str(source_trace), "--log", str(source_log)
    )
    dest = start("listen", dest_image, dest_sock, "--trace", str(dest_trace))
    watchers: list[subprocess.Popen[bytes]] = []
    try:
        watchers.append(follow(source_sock))
        watchers.append(follow(source_sock, "--no-current"))
        mirror = run(mirror_command(dest.port, source_sock, "--wait"))
        # The source exits after the handoff (action exit), ending both streams.
        assert source.proc.wait(timeout=30) == 0
        (code, events, stderr), (live_code, live, live_stderr) = map(finish, watchers)
        assert (code, live_code) == (0, 0), stderr + live_stderr
        assert dest.stop() == 0
        yield Migration(
            tmp,
            source_image,
            dest_image,
            source_trace,
            dest_trace,
            source_log,
            events,
            live,
            stderr,
            mirror.stdout.decode(),
        )
    finally:
        for proc in watchers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        source.stop()
        dest.stop()


def test_events_show_the_whole_migration_as_the_source_trace_has_it(migration: Migration) -> None:
    trace = migration.source_trace.read_text().splitlines()
    live = migration.live
    # Everything from the subscription on, line for line, in order.
    assert live == trace[len(trace) - len(live) :]
    records = [TraceRecord.from_json(line) for line in live]
    assert [r.time for r in records] == sorted(r.time for r in records)
    role = [r.event for r in records if r.machine == "role"]
    assert role == ["migrate", "quiesce", "hand_off", "handed_off", "shutdown"]
    steps = [r.event for r in records if r.machine == "migration"]
    assert steps[0] == CREATED and steps[-1] == "committed"
    assert {"connected", "accepted", "quiesce", "commit"} <= set(steps)
    assert all(r.ok for r in records)
    # The stream ended with the server, after its last transition.
    assert records[-1].event == "shutdown"
    assert "the server is shutting down" in migration.events_stderr


def test_events_first_print_where_every_machine_stood(migration: Migration) -> None:
    trace = migration.source_trace.read_text().splitlines()
    before = trace[: len(trace) - len(migration.live)]
    current, rest = (
        migration.events[: len(migration.events) - len(migration.live)],
        migration.events[len(migration.events) - len(migration.live) :],
    )
    assert rest == migration.live
    last: dict[tuple[str, str], str] = {}
    for line in before:
        rec = TraceRecord.from_json(line)
        last[(rec.machine, rec.instance)] = line
    assert sorted(current) == sorted(last.values())
    states = {
        TraceRecord.from_json(line).machine: TraceRecord.from_json(line).dest for line in current
    }
    assert states == {"role": "serving", "lease": "held"}


def test_the_copy_is_the_source_byte_for_byte(migration: Migration) -> None:
    assert "has control of the image" in migration.mirror_out
    assert sha256(migration.dest_image) == sha256(migration.source_image)


def test_trace_show_prints_and_draws_every_machine_instance(migration: Migration) -> None:
    svg = migration.tmp / "timeline.svg"
    out = run(
        [
            *FERRY,
            "trace",
            "show",
            str(migration.source_trace),
            str(migration.dest_trace),
            "--svg",
            str(svg),
        ]
    ).stdout.decode()
    src, dst = str(migration.source_trace), str(migration.dest_trace)
    headings = [
        f"{src}: role disk",
        f"{src}: migration disk",
        f"{dst}: role disk",
    ]
    for heading in headings:
        assert f"\n{heading}\n" in out, out
    lanes_in_text = [line for line in out.splitlines() if line.startswith((src, dst))]
    assert len(lanes_in_text) == 5  # role, lease, migration on the source; role, lease here
    source_role = out.split(f"\n{src}: role disk\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert source_role[0].split() == ["entered", "state", "for", "by"]
    assert [row.split()[1] for row in source_role[1:]] == [
        "starting",
        "serving",
        "migrating",
        "quiescing",
        "handing_off",
        "handed_off",
        "stopped",
    ]
    assert source_role[-1].split()[2:] == ["-", "shutdown"]

    root = ET.parse(svg).getroot()
    lanes = root.findall(f".//{SVG}g[@class='lane']")
    assert len(lanes) == 5
    labels = [lane.findtext(f"{SVG}title") for lane in lanes]
    assert labels[0] == f"{src}: role disk"
    dest_role = lanes[labels.index(f"{dst}: role disk")]
    states = [band.get("data-state") for band in dest_role.findall(f"{SVG}g[@class='band']")]
    assert states == ["starting", "listening", "receiving", "committing", "serving", "stopped"]


def test_the_json_log_joins_the_trace_on_its_fields(migration: Migration) -> None:
    events = [json.loads(line) for line in migration.source_log.read_text().splitlines()]
    assert all(event["export"] == "disk" for event in events)
    logged = {
        (e["machine"], e["instance"], e["event"], e["time"])
        for e in events
        if e.get("log_namespace") == "ferry.trace"
    }
    trace = [
        TraceRecord.from_json(line) for line in migration.source_trace.read_text().splitlines()
    ]
    assert logged == {(r.machine, r.instance, r.event, r.time) for r in trace}
    formats = [e.get("log_format", "") for e in events]
    assert any(f.startswith("mirror of {export}") for f in formats)  # the migration's own lines
    assert any(f.startswith("{doing} {file}") for f in formats)  # serving ... on ADDR:PORT


# -- bad inputs -------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[FerryProcess, Path]]:
    sock = tmp_path / "ctl.sock"
    proc = start("serve", sparse_file(tmp_path / "disk.img", MiB), sock, "--lockspace", "none")
    yield proc, sock
    proc.stop()


def test_a_bad_subscribe_request_is_an_error_and_the_connection_goes_on(
    server: tuple[FerryProcess, Path],
) -> None:
    _, sock = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        reader = conn.makefile("rb")
        requests = [
            {"id": 1, "method": "subscribe", "params": {"machine": "role"}},
            {"id": 2, "method": "unsubscribe"},
            {"id": 3, "method": "subscribe", "params": {"current": False}},
            {"id": 4, "method": "subscribe"},
        ]
        for request in requests:
            conn.sendall(json.dumps(request).encode() + b"\n")
        answers = [json.loads(reader.readline()) for _ in requests]
    assert answers[0]["error"]["code"] == -32602
    assert "'machine'" in answers[0]["error"]["message"]
    assert answers[1]["error"] == {"code": 1, "message": "not subscribed"}
    assert answers[2] == {"id": 3, "result": {"subscribed": True, "max_backlog_bytes": 262144}}
    assert answers[3]["error"]["message"] == "already subscribed on this connection"


def test_events_on_a_socket_nobody_listens_on_is_one_line(tmp_path: Path) -> None:
    missing = run([*FERRY, "events", "--sock", str(tmp_path / "none.sock")], check=False)
    assert missing.returncode == 1
    assert missing.stderr.decode() == (
        f"ferry: control socket {tmp_path}/none.sock: no such file\n"
    )
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(stale))  # bound, never listening: what a dead server leaves
        refused = run([*FERRY, "events", "--sock", str(stale)], check=False)
    assert refused.returncode == 1
    assert refused.stderr.decode() == f"ferry: control socket {stale}: Connection refused\n"
    assert refused.stdout == b""


def test_events_says_so_when_the_server_dies(server: tuple[FerryProcess, Path]) -> None:
    proc, sock = server
    watcher = follow(sock)
    proc.stop(signal.SIGKILL)
    code, out, err = finish(watcher)
    assert code == 1
    assert err == f"ferry: control socket {sock}: the server went away\n"
    assert [TraceRecord.from_json(line).dest for line in out] == ["serving"]


def test_events_stops_cleanly_on_sigint_and_sigterm(server: tuple[FerryProcess, Path]) -> None:
    _, sock = server
    for sig in (signal.SIGINT, signal.SIGTERM):
        watcher = follow(sock, "--no-current")
        watcher.send_signal(sig)
        code, out, err = finish(watcher)
        assert (code, out, err) == (0, [], "ferry events: stopped\n"), sig


def test_trace_show_refuses_what_is_not_a_trace(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"time": 1}\nnot json\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    cases = {
        tmp_path / "missing.jsonl": f"trace {tmp_path}/missing.jsonl: No such file or directory",
        garbage: f"{garbage}: line 1: missing machine, instance, event, source, dest, ok",
        empty: f"trace {empty}: no records",
        binary: f"trace {binary}: not a text file",
    }
    for path, message in cases.items():
        result = run([*FERRY, "trace", "show", str(path)], check=False)
        assert (result.returncode, result.stderr.decode()) == (1, f"ferry: {message}\n"), path
        assert result.stdout == b""


def test_log_to_an_unwritable_path_is_one_line(tmp_path: Path) -> None:
    image = sparse_file(tmp_path / "disk.img", MiB)
    for target, why in (
        (tmp_path / "no" / "log.json", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        result = run([*FERRY, *serve_args(image, "--log", str(target))], check=False)
        assert result.returncode == 1
        assert result.stderr.decode() == f"ferry: log file {target}: {why}\n"
