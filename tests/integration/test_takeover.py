"""``ferry serve --takeover``: a new process takes a live export over, on the same host.

A real libnbd client (``tests/takeover_writer.py``, Debian's bindings)
writes the checkable pattern of ``tests/workload.py`` with 16 writes in
flight, all the time, on one connection, while a second ``ferry serve
--takeover SOCK`` takes the export from the first.  It must see a pause,
never an error: the same connection (the same local port) before and
after, every write answered, and every acknowledged write in the image
byte for byte, with every block it never wrote still the original's.  The
old process exits 0; the new one holds the lease under the same token.

Then what must not happen: a new process that cannot read the old one's
state is refused before anything moves, and one killed in the middle of
the takeover (stopped at a named pause point, ``ferry.faults``, then
SIGKILLed) leaves the old process serving, its client none the wiser --
and able to hand over for real afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from etcd_support import EtcdServer, etcd_fixture
from ferry.status import parse_line
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    QemuIo,
    Writers,
    check_acked,
    daemon,
    random_file,
    read_line,
    run,
    wait_until,
)
from workload import BLOCK, lost_writes

pytestmark = pytest.mark.integration

__all__ = ["etcd_fixture"]  # the module's etcd fixture, for pytest

MiB = 1 << 20
SIZE = 16 * MiB
DEPTH = 16
WRITER = Path(__file__).resolve().parents[1] / "takeover_writer.py"

# A libnbd client over TLS (argv[1], an nbds:// URI): reads until the stop file (argv[2])
# appears or the connection fails; says how it ended.
TLS_READER = """
import json, os, sys
import nbd
handle = nbd.NBD()
handle.set_uri_allow_local_file(True)
handle.connect_uri(sys.argv[1])
reads, ended = 0, "stopped"
while not os.path.exists(sys.argv[2]):
    try:
        handle.pread(4096, (reads % 256) * 4096)
    except nbd.Error as error:
        ended = "error"
        break
    reads += 1
print(json.dumps({"reads": reads, "ended": ended}))
"""


class Writer:
    """The libnbd writer in a child process, driven by its stdin, heard on its stdout."""

    def __init__(self, uri: str, span: int = SIZE) -> None:
        """It writes the blocks of the image's first ``span`` bytes."""
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(WRITER), uri, "1", str(span // BLOCK), str(DEPTH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def expect(self, event: str, deadline: Deadline | None = None) -> dict[str, Any]:
        deadline = deadline or Deadline()
        assert self.proc.stdout is not None
        while True:
            line = read_line(self.proc.stdout, deadline)
            if not line:
                self.proc.wait(timeout=deadline.left())
                assert self.proc.stderr is not None
                raise AssertionError(
                    f"the writer exited {self.proc.returncode} before {event!r}: "
                    f"{self.proc.stderr.read().decode()[-2000:]}"
                )
            message: dict[str, Any] = json.loads(line)
            if message["event"] == event:
                return message

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def writes_on(self, n: int = 500) -> None:
        """Wait until ``n`` more writes have been acknowledged."""
        self.send(f"after {n}")
        self.expect("after")

    def stop(self) -> dict[str, Any]:
        self.send("stop")
        done = self.expect("done")
        self.proc.wait(timeout=30)
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def lockspace(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if getattr(request, "param", "local") == "etcd":
        etcd: EtcdServer = request.getfixturevalue("etcd")
        return f"etcd:{etcd.url}"
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    return f"local:{locks}"


@pytest.fixture
def rig(tmp_path: Path, lockspace: str) -> Iterator[Rig]:
    rig = Rig(tmp_path, lockspace)
    yield rig
    rig.close()


class Rig:
    """An image, the ferry serving it, and its writer; the processes a test starts."""

    def __init__(
        self,
        tmp_path: Path,
        lockspace: str,
        sock: Path | None = None,
        span: int = SIZE,
        serve_args: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp_path
        self.lockspace = lockspace
        self.image = random_file(tmp_path / "disk.img", SIZE, seed=11)
        self.original = tmp_path / "original.img"
        self.original.write_bytes(self.image.read_bytes())
        self.sock = sock or tmp_path / "ctl.sock"
        self.processes: list[FerryProcess] = []
        self.old = self.serve(*serve_args)
        self.writer = Writer(self.old.uri("disk"), span)

    def serve(self, *extra: str, env: dict[str, str] | None = None) -> FerryProcess:
        process = FerryProcess(
            [
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                "0",
                "--file",
                str(self.image),
                "--name",
                "disk",
                "--sock",
                str(self.sock),
                "--lockspace",
                self.lockspace,
                "--trace",
                str(self.tmp / "old.jsonl"),
                *extra,
            ],
            env=env,
        ).wait_serving()
        self.processes.append(process)
        return process

    def take_over(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        trace: str = "new.jsonl",
        sock: Path | None = None,
    ) -> FerryProcess:
        """``ferry serve --takeover`` of the old process's control socket (not yet waited on)."""
        path = sock or self.sock
        process = FerryProcess(
            ["serve", "--takeover", str(path), "--trace", str(self.tmp / trace), *extra],
            env=env,
        )
        self.processes.append(process)
        return process

    def status(self) -> dict[str, str]:
        return parse_line(run([*FERRY, "status", "--sock", str(self.sock)]).stdout.decode())

    def check_image(self, report: dict[str, Any], others: dict[int, bytes] | None = None) -> None:
        """Every acknowledged write is in the image, and every write of ``others`` (bytes by
        offset, another client's); every other block is the original's."""
        image, original = self.image.read_bytes(), self.original.read_bytes()
        assert report["acked"] and lost_writes(image, report) == []
        written = {int(offset) for offset in report["acked"]}
        for offset, data in (others or {}).items():
            assert image[offset : offset + len(data)] == data, offset
            written.update(range(offset, offset + len(data), BLOCK))
        for offset in range(0, SIZE, BLOCK):
            if offset not in written:
                assert image[offset : offset + BLOCK] == original[offset : offset + BLOCK], offset

    def close(self) -> None:
        self.writer.kill()
        for process in self.processes:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


def replayed(trace: Path) -> dict[str, str]:
    """``ferry trace replay``: the final state of each machine, by ``machine instance``."""
    out = run([*FERRY, "trace", "replay", str(trace)]).stdout.decode()
    return {" ".join(line.split()[:2]): line.split()[2] for line in out.splitlines()}


def assert_untouched(done: dict[str, Any], started: dict[str, Any]) -> None:
    """The writer's verdict: one connection throughout, nothing failed, nothing left."""
    assert done["ended"] == "stopped" and done["error"] == "", done["error"]
    assert done["local_at_start"] == done["local_at_end"] == started["local"]
    assert done["unanswered"] == {}


# -- the takeover ------------------------------------------------------------------------


@pytest.mark.parametrize("lockspace", ["local", "etcd"], indirect=True)
def test_a_writer_with_16_in_flight_sees_a_pause_not_a_disconnect(rig: Rig) -> None:
    started = rig.writer.expect("started")
    before = rig.status()
    assert before["state"] == "serving" and before["num_clients"] == "1"
    token = before["lease_token"]

    began = time.monotonic()
    new = rig.take_over().wait_serving()
    assert new.port == rig.old.port
    assert rig.old.proc.wait(timeout=30) == 0  # the old process exits 0 once all is handed on
    ended = time.monotonic()
    rig.writer.writes_on(1000)  # ... and the client writes on, to the new one

    after = rig.status()  # the same control socket, answered by the new process
    assert after["pid"] == str(new.proc.pid) != before["pid"]
    assert after["state"] == "serving" and after["num_clients"] == "1"
    assert (after["connections_moved"], after["connections_aborted"]) == ("1", "0")
    assert (after["lease_state"], after["lease_token"]) == ("held", token)  # the same grant
    holders = run(
        [*FERRY, "lock", "status", "--lockspace", rig.lockspace, "--resource", str(rig.image)]
    ).stdout.decode()
    assert f"token {token}" in holders and holders.count("\n") == 1, holders

    done = rig.writer.stop()
    assert_untouched(done, started)
    # For the record (-s), not a check: the longest wait between two replies while the
    # takeover ran, if it is among the writer's longest (a busy host makes others too).
    pause = max((g for g in done["gaps"] if g[2] >= began and g[1] <= ended), default=None)
    print(
        f"takeover ({rig.lockspace.split(':')[0]}): {done['writes']} writes; the client's "
        "longest pause between two replies during the takeover: "
        + ("not among its longest" if pause is None else f"{pause[0] * 1000:.1f} ms")
    )
    assert new.stop() == 0
    rig.check_image(done)
    assert replayed(rig.tmp / "old.jsonl") == {
        "role disk": "stopped",
        f"lease {rig.image}": "stopped",
        "takeover 1": "handed_over",
    }
    assert replayed(rig.tmp / "new.jsonl") == {
        "role disk": "stopped",
        f"lease {rig.image}": "stopped",
    }
    log = rig.old.stderr_text()
    assert "handed export 'disk' over (confirmed)" in log, log


def tcp_connections(pid: int) -> set[tuple[str, str]]:
    """The established TCP connections of process ``pid``: (local, peer) addresses (ss)."""
    out = run(["ss", "-tnpH", "state", "established"]).stdout.decode()
    return {
        (fields[2], fields[3])
        for fields in (line.split() for line in out.splitlines())
        if f"pid={pid}," in line_of(fields)
    }


def line_of(fields: list[str]) -> str:
    return " ".join(fields)


def test_qemu_io_and_a_libnbd_writer_keep_their_connections_and_every_byte(
    tmp_path: Path,
) -> None:
    """Two real clients of two implementations: qemu-io writes and reads back (verified by
    qemu-io itself) 64 KiB at a time on one connection in the last 4 MiB, the writer the
    rest, 16 in flight.  Neither reconnects: the same 4-tuple before and after."""
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    span = SIZE - QemuIo.SLOTS * QemuIo.SLOT
    rig = Rig(tmp_path, f"local:{locks}", span=span)
    qemu = None
    try:
        started = rig.writer.expect("started")
        qemu = QemuIo([], rig.old.uri("disk"), span)
        wait_until("qemu-io connects", lambda: rig.status()["num_clients"] == "2")
        connection = tcp_connections(qemu.proc.pid)
        assert len(connection) == 1, connection
        wait_until("qemu-io writes", lambda: qemu is not None and qemu.pairs > 20)
        new = rig.take_over().wait_serving()
        pairs_at_takeover = qemu.pairs
        assert rig.old.proc.wait(timeout=30) == 0
        rig.writer.writes_on(1000)
        wait_until(
            "qemu-io goes on", lambda: qemu is not None and qemu.pairs > pairs_at_takeover + 50
        )
        assert tcp_connections(qemu.proc.pid) == connection  # the same connection, never another
        status = rig.status()
        assert (status["num_clients"], status["connections_moved"]) == ("2", "2"), status
    finally:
        output = qemu.finish() if qemu is not None else ""
    done = rig.writer.stop()
    assert_untouched(done, started)
    assert new.stop() == 0
    rig.close()
    # qemu-io verified every read-back itself; none failed, every command answered.
    assert "Pattern verification failed" not in output and "error" not in output.lower(), output
    assert output.count("wrote 65536/65536") == output.count("read 65536/65536") == qemu.pairs
    rig.check_image(done, others=qemu.last_written())


def test_the_old_and_the_new_process_never_both_serve(rig: Rig) -> None:
    """Stopped between "yours" and "serving", the new process serves nothing yet, and the old
    one holds every request (passing_on); once it serves, the old one never serves again.
    The traces' clocks are this host's: the old role left serving before the new one
    entered it."""
    started = rig.writer.expect("started")
    new = rig.take_over(env=dict(os.environ, FERRY_PAUSE_AT="takeover_committed"))
    new.wait_for_log("paused at takeover_committed")
    held = rig.status()  # the old process answers: the new one has adopted no socket yet
    assert held["pid"] == str(rig.old.proc.pid)
    assert (held["state"], held["num_clients"]) == ("passing_on", "1"), held
    new.proc.send_signal(signal.SIGCONT)
    new.wait_serving()
    assert rig.old.proc.wait(timeout=30) == 0
    rig.writer.writes_on(500)
    done = rig.writer.stop()
    assert_untouched(done, started)
    assert new.stop() == 0
    rig.check_image(done)

    def role(trace: str) -> list[tuple[float, str]]:
        records = [json.loads(line) for line in (rig.tmp / trace).read_text().splitlines()]
        return [(r["time"], r["dest"]) for r in records if r["machine"] == "role" and r["ok"]]

    old, new_role = role("old.jsonl"), role("new.jsonl")
    assert [state for _, state in old] == [
        "starting",
        "serving",
        "passing_on",
        "handed_off",
        "stopped",
    ]
    assert [state for _, state in new_role] == ["starting", "serving", "stopped"]
    left_serving, began_serving = old[2][0], new_role[1][0]
    assert left_serving <= began_serving, (old, new_role)


def test_a_tls_client_is_disconnected_the_others_move_and_tls_is_served_as_before(
    tmp_path: Path,
) -> None:
    """A TLS session lives in the old process's memory, not in the kernel's socket: its
    client cannot move (it is disconnected, and may reconnect to the new process, which
    serves TLS with the old one's certificates); a plaintext client beside it moves."""
    from tls_support import make_pki

    pki = make_pki(tmp_path / "pki")
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    rig = Rig(
        tmp_path, f"local:{locks}", serve_args=("--tls", "on", "--tls-certificates", str(pki.node))
    )
    stop = tmp_path / "stop"
    tls_uri = f"nbds://127.0.0.1:{rig.old.port}/disk?tls-certificates={pki.node}"
    try:
        rig.writer.expect("started")
        tls_reader = subprocess.Popen(
            ["/usr/bin/python3", "-c", TLS_READER, tls_uri, str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_until("two clients", lambda: rig.status()["num_clients"] == "2")
        new = rig.take_over().wait_serving()
        assert rig.old.proc.wait(timeout=30) == 0
        out, _ = tls_reader.communicate(timeout=60)  # it ends: its connection was closed
        tls_report = json.loads(out)
        assert tls_report["ended"] == "error" and tls_report["reads"] > 0, tls_report
        status = rig.status()
        assert (status["num_clients"], status["connections_moved"]) == ("1", "1"), status
        # The new process serves TLS as the old one did: a TLS client connects and reads.
        info = run(["nbdinfo", "--size", tls_uri])
        assert info.stdout.strip() == str(SIZE).encode()
        rig.writer.writes_on(500)
        done = rig.writer.stop()
        assert done["ended"] == "stopped" and done["local_at_start"] == done["local_at_end"]
        assert new.stop() == 0
    finally:
        stop.touch()
        rig.close()
    rig.check_image(done)


# -- a daemon: every export at once ---------------------------------------------------------


def test_a_daemon_hands_every_export_on_with_its_clients(tmp_path: Path) -> None:
    """``ferry daemon --config FILE --takeover SOCK``: the exports as the old daemon runs them
    (one added at run time too), each with its libnbd writer, its lease and its ACL; the
    file is the new daemon's to reload.  A file whose node is not the old one's is refused
    before anything is held."""
    (tmp_path / "locks").mkdir(mode=0o700)
    for seed, name in enumerate(["a", "b", "c", "d"], start=21):
        random_file(tmp_path / f"{name}.img", SIZE, seed=seed)
    originals = {name: (tmp_path / f"{name}.img").read_bytes() for name in "abcd"}
    config = tmp_path / "ferry.toml"
    node = 'addr = "127.0.0.1"\nport = 0\nsock = "ferry.sock"\nlockspace = "local:locks"\n'
    tables = "".join(f'\n[[export]]\nname = "{n}"\nfile = "{n}.img"\n' for n in "abc")
    config.write_text(node + tables)
    sock = str(tmp_path / "ferry.sock")
    old = daemon(config)
    processes = [old]
    try:
        # d comes at run time, not from the file; c's ACL is changed at run time (to one
        # that refuses this host), a's too (to one that admits it).
        run(
            [
                *FERRY,
                "export",
                "add",
                "--sock",
                sock,
                "--name",
                "d",
                "--file",
                str(tmp_path / "d.img"),
            ]
        )
        run([*FERRY, "acl", "--sock", sock, "--export", "a", "127.0.0.1"])
        assert run(["nbdinfo", old.uri("c")], check=False).returncode == 0
        run([*FERRY, "acl", "--sock", sock, "--export", "c", "192.0.2.1"])
        refused = run(["nbdinfo", old.uri("c")], check=False)
        assert refused.returncode != 0, refused.stderr
        assert b"not supported for export: c" in refused.stderr, refused.stderr
        stop = tmp_path / "stop"
        writers = Writers({name: old.uri(name) for name in ("a", "b", "d")}, SIZE // BLOCK, stop)
        wait_until("three writers", lambda: _clients(sock) == {"a": 1, "b": 1, "c": 0, "d": 1})
        tokens = _tokens(tmp_path, "abcd")

        wrong = run(
            [
                *FERRY,
                "daemon",
                "--config",
                str(_with_port(config, old.port + 1)),
                "--takeover",
                sock,
            ],
            check=False,
        )
        assert wrong.returncode == 1
        assert f"--port {old.port + 1} is not the old process's {old.port}" in wrong.stderr.decode()

        new = FerryProcess(["daemon", "--config", str(config), "--takeover", sock])
        processes.append(new)
        new.wait_for_log("ready: 4 exports")
        assert old.proc.wait(timeout=30) == 0
        assert "took 4 exports over from process" in new.stderr_text()
        assert _clients(sock) == {"a": 1, "b": 1, "c": 0, "d": 1}
        for name in "abd":  # each one's client moved, on its own connection
            status = parse_line(
                run([*FERRY, "status", "--sock", sock, "--export", name]).stdout.decode()
            )
            assert (status["pid"], status["state"]) == (str(new.proc.pid), "serving")
            assert (status["connections_moved"], status["connections_aborted"]) == ("1", "0")
        assert _tokens(tmp_path, "abcd") == tokens  # the same grants, none taken anew
        rows = json.loads(run([*FERRY, "export", "list", "--sock", sock, "--json"]).stdout)
        assert [row["name"] for row in rows] == ["a", "b", "c", "d"]
        # c's ACL as it was at run time, not the file's (none): this host is refused.
        refused = run(["nbdinfo", old.uri("c")], check=False)  # the same port, the new process
        assert refused.returncode != 0, refused.stderr
        assert b"not supported for export: c" in refused.stderr, refused.stderr
        assert run(["nbdinfo", old.uri("b")], check=False).returncode == 0

        # The new daemon reloads its file: an export added there starts, d (run time) stays.
        random_file(tmp_path / "e.img", SIZE, seed=30)
        config.write_text(node + tables + '\n[[export]]\nname = "e"\nfile = "e.img"\n')
        reloaded = run([*FERRY, "reload", "--sock", sock]).stdout.decode()
        assert "started e" in reloaded, reloaded
        assert _clients(sock) == {"a": 1, "b": 1, "c": 0, "d": 1, "e": 0}

        reports = writers.stop()
        assert new.stop() == 0
    finally:
        for process in processes:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
    for name, report in reports.items():
        assert report["ended"] == "stopped", report
        assert report["local_start"] == report["local_end"], report  # one connection
        image = (tmp_path / f"{name}.img").read_bytes()
        check_acked(report, image)
        written = {int(offset) for offset in report["acked"]} | {
            int(offset) for offset in report["unanswered"]
        }
        for offset in range(0, SIZE, BLOCK):
            if offset not in written:
                assert image[offset : offset + BLOCK] == originals[name][offset : offset + BLOCK]
    assert (tmp_path / "c.img").read_bytes() == originals["c"]


def _clients(sock: str) -> dict[str, int]:
    rows = json.loads(run([*FERRY, "export", "list", "--sock", sock, "--json"]).stdout)
    return {row["name"]: row["clients"] for row in rows}


def _tokens(tmp_path: Path, names: str) -> dict[str, str]:
    """Each image's lease holders, as ``ferry lock status`` says them."""
    return {
        name: run(
            [
                *FERRY,
                "lock",
                "status",
                "--lockspace",
                f"local:{tmp_path / 'locks'}",
                "--resource",
                str(tmp_path / f"{name}.img"),
            ]
        ).stdout.decode()
        for name in names
    }


def _with_port(config: Path, port: int) -> Path:
    other = config.with_name("other.toml")
    other.write_text(config.read_text().replace("port = 0", f"port = {port}"))
    return other


# -- what must not happen ----------------------------------------------------------------


def test_a_state_format_the_new_process_does_not_read_is_refused_before_anything_moves(
    rig: Rig,
) -> None:
    started = rig.writer.expect("started")
    refused = rig.take_over("--takeover-format", "99")
    assert refused.proc.wait(timeout=60) == 1
    error = refused.stderr_text()
    assert "state format version 1 is not one this process reads (99)" in error, error
    assert "the old process serves on" in error, error
    rig.old.wait_for_log("no takeover")
    rig.writer.writes_on(500)
    assert rig.status()["state"] == "serving" and rig.old.proc.poll() is None
    done = rig.writer.stop()
    assert_untouched(done, started)
    assert rig.old.stop() == 0
    rig.check_image(done)
    assert replayed(rig.tmp / "old.jsonl")["takeover 1"] == "resumed"


@pytest.mark.parametrize("point", ["takeover_received", "takeover_committed"])
def test_a_new_process_killed_mid_takeover_leaves_the_old_one_serving(rig: Rig, point: str) -> None:
    """Killed holding every descriptor (before "ready"), or told "yours" but before it said
    "serving": either way it touched nothing, and the old process takes everything back."""
    started = rig.writer.expect("started")
    dying = rig.take_over(env=dict(os.environ, FERRY_PAUSE_AT=point), trace="dying.jsonl")
    dying.wait_for_log(f"paused at {point}")
    dying.proc.send_signal(signal.SIGKILL)
    dying.proc.wait(timeout=30)
    rig.old.wait_for_log("no takeover")
    rig.writer.writes_on(500)
    status = rig.status()
    assert status["state"] == "serving" and status["pid"] == str(rig.old.proc.pid)
    assert status["lease_state"] == "held"
    assert replayed(rig.tmp / "old.jsonl")["takeover 1"] == "resumed"

    # The old process is whole: a takeover now goes through.
    new = rig.take_over().wait_serving()
    assert rig.old.proc.wait(timeout=30) == 0
    rig.writer.writes_on(500)
    done = rig.writer.stop()
    assert_untouched(done, started)
    assert new.stop() == 0
    rig.check_image(done)


def test_options_that_are_not_the_old_process_s_are_refused_before_anything_is_held(
    rig: Rig,
) -> None:
    rig.writer.expect("started")
    wrong = rig.take_over("--port", str(rig.old.port + 1), "--name", "disk", "--read-only")
    assert wrong.proc.wait(timeout=60) == 1
    error = wrong.stderr_text()
    assert f"--port {rig.old.port + 1} is not the old process's {rig.old.port}" in error, error
    assert "--read-only on is not the old process's off" in error, error
    assert "--name" not in error  # the same name: no complaint
    assert "takeover" not in " ".join(replayed(rig.tmp / "old.jsonl"))  # nothing was held
    rig.writer.writes_on(100)
    nobody = run([*FERRY, "serve", "--takeover", str(rig.tmp / "nobody.sock")], check=False)
    assert nobody.returncode == 1
    assert b"nobody.sock: no such file" in nobody.stderr, nobody.stderr
    plain = run([*FERRY, "serve", "--file", str(rig.image)], check=False)
    assert plain.returncode == 2
    assert b"the following arguments are required: -l/--addr, -p/--port" in plain.stderr
    wait_until("the old process still serves", lambda: rig.status()["state"] == "serving")


# -- who may take a node over ---------------------------------------------------------------

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

# Run as nobody: ask the control socket at argv[1] for a takeover, as `ferry serve
# --takeover` does; say what came back (a refusal, or descriptors).
RAW_TAKEOVER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as error:
    print(json.dumps({"connect": error.strerror}))
    sys.exit(0)
s.sendall(b'{"id": 1, "method": "takeover", "params": {}}\\n')
data, ancillary, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
print(json.dumps({"answer": data.decode(errors="replace"), "ancillary": len(ancillary)}))
"""

# Run as nobody: a server at argv[1] posing as a ferry; it says what it was sent.
FAKE_SERVER = """
import os, socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
server.listen()
print("listening", flush=True)
conn, _ = server.accept()
data = b""
while chunk := conn.recv(4096):
    data += chunk
print(repr(data), flush=True)
"""


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under /tmp that nobody may enter (its own 0700 would keep nobody out)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="takeover-attack-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_only_this_user_or_root_may_take_over_and_no_one_else_s_symlink_is_followed(
    tmp_path: Path, shared_tmp: Path
) -> None:
    """The attacks, by uid 65534 (nobody) on a root ferry whose control socket is reachable."""
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    rig = Rig(tmp_path, f"local:{locks}", sock=shared_tmp / "ctl.sock")
    try:
        started = rig.writer.expect("started")
        refused = "neither this user nor root"

        # 1. nobody asks for the node on its control socket: 0600, so the kernel says no;
        # made 0666 (an operator's mistake), ferry says no, and hands nothing out.
        ask = [*AS_NOBODY, "/usr/bin/python3", "-c", RAW_TAKEOVER, str(rig.sock)]
        assert json.loads(run(ask).stdout) == {"connect": "Permission denied"}
        rig.sock.chmod(0o666)
        answer = json.loads(run(ask).stdout)
        assert answer["ancillary"] == 0, answer  # no descriptor came with the answer
        error = json.loads(answer["answer"])["error"]
        assert (
            error["message"] == f"takeover: uid {NOBODY} may not; only this server's user or root"
        )
        rig.old.wait_for_log(f"refused takeover to a client running as uid {NOBODY}")
        rig.sock.chmod(0o600)

        # 2. nobody's symlink to the real socket, in nobody's own directory (the kernel's
        # protected_symlinks does not cover that, whatever its setting): not followed.
        theirs = shared_tmp / "nobody"
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        link = theirs / "ctl.sock"
        run([*AS_NOBODY, "ln", "-s", str(rig.sock), str(link)])
        assert link.lstat().st_uid == NOBODY
        taker = run([*FERRY, "serve", "--takeover", str(link)], check=False)
        assert taker.returncode == 1
        assert f"{link} is a symbolic link of uid {NOBODY}" in taker.stderr.decode()
        assert "refusing to follow it" in taker.stderr.decode()

        # 3. nobody's own server posing as a ferry, in a sticky directory everyone may use:
        # told apart by the kernel's word on who listens, before a byte is sent to it.
        sticky = shared_tmp / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        fake_sock = sticky / "ferry.sock"
        fake = subprocess.Popen(
            [*AS_NOBODY, "/usr/bin/python3", "-c", FAKE_SERVER, str(fake_sock)],
            stdout=subprocess.PIPE,
        )
        try:
            assert fake.stdout is not None
            assert read_line(fake.stdout, Deadline()) == b"listening\n"
            taker = run([*FERRY, "serve", "--takeover", str(fake_sock)], check=False)
            assert taker.returncode == 1
            assert f"runs as uid {NOBODY}, {refused}" in taker.stderr.decode(), taker.stderr
            assert read_line(fake.stdout, Deadline()) == b"b''\n"  # it was sent nothing
        finally:
            fake.kill()
            fake.wait()

        # None of it held a request, or moved anything: the old process never noticed.
        rig.writer.writes_on(500)
        status = rig.status()
        assert status["state"] == "serving" and status["pid"] == str(rig.old.proc.pid)
        assert not any(key.startswith("takeover") for key in replayed(rig.tmp / "old.jsonl"))

        # The real path, by root: through our own symlink too.
        ours = tmp_path / "ours.sock"
        ours.symlink_to(rig.sock)
        new = rig.take_over(sock=ours).wait_serving()
        assert rig.old.proc.wait(timeout=30) == 0
        rig.writer.writes_on(500)
        done = rig.writer.stop()
        assert_untouched(done, started)
        assert new.stop() == 0
        rig.check_image(done)
    finally:
        rig.close()
