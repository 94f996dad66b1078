"""Regenerate the fuzz corpora's seeds from real sessions: ``python3 fuzz/seeds.py [TARGET...]``.

A seed is what a real peer said in one session, recorded on the wire and
written in its target's input format as ``fuzz/corpus/TARGET/seed-NAME``
(a seed of the same name is replaced; ``finding-*`` inputs, kept from fuzz
findings, are left alone):

* nbd_server: what nbdinfo, qemu-img, qemu-io, nbdsh (libnbd) and ferry's
  own clients (``ferry read``/``write``, ``ferry mirror``'s migration
  stream with ``FERRY_OPT_MIGRATE`` and ``FERRY_CMD_COMMIT``, and ``ferry
  proxy``'s upstream connection with ``FERRY_OPT_LOCATE``) send to ``ferry
  serve`` and ``ferry listen``, through a recording proxy.
* nbd_oldstyle: nbdinfo, qemu-io and nbdsh against ``ferry serve
  --oldstyle``, and ``ferry mirror --flexnbd`` into ``ferry listen --oldstyle``.
* nbd_client: what ``ferry serve`` (newstyle and oldstyle), ``ferry listen``,
  nbdkit (newstyle and oldstyle), qemu-nbd and nbd-server answer to the
  request script of fuzz/nbd_client.py, sent by ferry's ``ClientConnection``;
  and what a ``ferry serve`` that handed its image off answers
  ``FERRY_OPT_LOCATE`` (where the image went).
* control_lines, control_json: what ``ferry status``, ``acl``, ``break``,
  ``mirror-max-bps``, ``mirror --wait`` and ``JsonControl.subscribe`` send to
  a control socket, through a recording Unix-socket proxy.

It needs the peers scripts/install-deps.sh --test installs, talks on
loopback only, and takes about a minute.  The images are small and mostly
holes, so the seeds stay small.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import nbd_client  # noqa: E402
from ferry.control.client import JsonControl  # noqa: E402
from ferry.nbd.events import NegotiationFailed, ProtocolError  # noqa: E402
from fuzzing import TARGETS  # noqa: E402
from support import (  # noqa: E402
    FERRY,
    FerryProcess,
    ProxyProcess,
    mirror_command,
    run,
    serve,
    sparse_file,
    start_peer,
    stop_peer,
)

CORPUS: Final = HERE / "corpus"
SIZE: Final = 1 << 20  # nbd_server's and nbd_oldstyle's config index 1
DATA_AT: Final = [(0, 4096), (512 * 1024, 8192)]
HOST: Final = "127.0.0.1"
TIMEOUT: Final = 30.0

# Config bytes (see each target's docstring).
SERVER_PLAIN: Final = 0x01  # a 1 MiB export, no migration catalog
SERVER_MIGRATION: Final = 0x31  # ... with a migration catalog that admits the sender
SERVER_EXTRAS: Final = 0x81  # ... with a locator and the disk's flags capped
OLDSTYLE_SERVED: Final = 0x01
OLDSTYLE_MIRROR_ONLY: Final = 0x11

# nbd_client's request script: READ 4096, READ DF 512, WRITE 512, WRITE FUA
# 512, FLUSH, TRIM 4096, CACHE 4096, WRITE_ZEROES 4096 (and with NO_HOLE),
# BLOCK_STATUS 65536 (and with REQ_ONE), READ 1, FERRY_CMD_COMMIT.  No DISC:
# qemu-nbd closes at once on one, without the replies still in flight.
CLIENT_SCRIPT: Final = bytes(
    [0xA0, 0x61, 0x62, 0x63, 0x04, 0xA5, 0xA6, 0xA7, 0xAE, 0xC8, 0xC9, 0x1C, 0x0A]
)
CLIENT_CONFIGS: Final = {
    "structured": 0x03,  # structured replies and base:allocation
    "simple": 0x00,
    "small-replies": 0x0B,
    "migrate": 0x07,  # FERRY_OPT_MIGRATE first
}
CLIENT_LOCATE: Final = 0x23  # structured, base:allocation, FERRY_OPT_LOCATE first


# -- recording ---------------------------------------------------------------------------


@dataclass
class Session:
    """One proxied connection: what the client sent, what the server answered."""

    sent: bytearray = field(default_factory=bytearray)
    answered: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)


class Recorder:
    """A proxy in front of ``upstream`` (a TCP port or a Unix socket path) that records."""

    def __init__(self, upstream: int | Path, work: Path) -> None:
        self.upstream = upstream
        self.sessions: list[Session] = []
        if isinstance(upstream, int):
            self._listener = socket.create_server((HOST, 0))
            self.address = f"{HOST}:{self._listener.getsockname()[1]}"
        else:
            path = work / f"proxy-{upstream.name}"
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(path))
            self._listener.listen()
            self.address = str(path)
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.upstream, int):
            return socket.create_connection((HOST, self.upstream), timeout=TIMEOUT)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.upstream))
        return conn

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            session = Session()
            self.sessions.append(session)
            threading.Thread(target=self._pump, args=(client, session), daemon=True).start()

    def _pump(self, client: socket.socket, session: Session) -> None:
        server = self._connect()
        ends = {client: (server, session.sent), server: (client, session.answered)}
        try:
            while ends:
                ready, _, _ = select.select(list(ends), [], [], TIMEOUT)
                if not ready:
                    break
                for conn in ready:
                    other, record = ends[conn]
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        record += data
                        with contextlib.suppress(OSError):
                            other.sendall(data)
                        continue
                    del ends[conn]
                    with contextlib.suppress(OSError):
                        other.shutdown(socket.SHUT_WR)
        finally:
            client.close()
            server.close()
            session.done.set()

    def finished(self) -> list[Session]:
        """The sessions so far, once each has ended."""
        for session in self.sessions:
            session.done.wait(TIMEOUT)
        return list(self.sessions)

    def close(self) -> None:
        self._listener.close()
        if not isinstance(self.upstream, int):
            os.unlink(self.address)


def recorded(upstream: int | Path, work: Path, client: Callable[[str], object]) -> list[Session]:
    """Run ``client`` against a recorder in front of ``upstream``; its sessions.

    ``client`` gets the recorder's address: "127.0.0.1:PORT" or a socket path.
    """
    recorder = Recorder(upstream, work)
    try:
        client(recorder.address)
        return recorder.finished()
    finally:
        recorder.close()


class Corpus:
    """Where seeds are written, for the targets asked for."""

    def __init__(self, targets: set[str]) -> None:
        self.targets = targets
        self.written: list[Path] = []

    def wants(self, target: str) -> bool:
        return target in self.targets

    def write(self, target: str, name: str, data: bytes) -> None:
        if not self.wants(target):
            return
        path = CORPUS / target / f"seed-{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written.append(path)


def image(work: Path, name: str) -> Path:
    return sparse_file(work / name, SIZE, data_at=DATA_AT)


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


# -- what NBD clients send ------------------------------------------------------------------

NBDSH_SCRIPT: Final = (
    "h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n"
    "h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)\n"
    "h.zero(65536, 65536)\n"
    "h.trim(4096, 8192)\n"
    "h.cache(4096, 0)\n"
    "h.flush()\n"
    "h.block_status(65536, 0, lambda *a: 0)\n"
    "h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)\n"
    "h.pread(1024, 512)\n"
)


def nbd_clients(address: str) -> dict[str, list[list[str]]]:
    """Each client's commands against ``address``."""
    uri = f"nbd://{address}/"
    port = port_of(address)
    return {
        "nbdinfo": [["nbdinfo", uri]],
        "nbdinfo-list": [["nbdinfo", "--list", uri]],
        "nbdinfo-map": [["nbdinfo", "--map", uri]],
        "qemu-img-info": [["qemu-img", "info", "-f", "raw", uri]],
        "qemu-img-map": [["qemu-img", "map", "-f", "raw", "--output=json", uri]],
        "qemu-io": [
            [
                *("qemu-io", "-f", "raw", uri),
                *("-c", "write -P 0x5a 4096 4096", "-c", "write -z 8192 4096"),
                *("-c", "discard 16384 4096", "-c", "flush", "-c", "read -P 0x5a 4096 4096"),
            ]
        ],
        "nbdsh": [
            ["/usr/bin/python3", "-m", "nbd", "--base-allocation", "-u", uri, "-c", NBDSH_SCRIPT]
        ],
        "ferry-write": [[*FERRY, "write", "-l", HOST, "-p", port, "-F", "1024", "-S", "2048"]],
        "ferry-read": [[*FERRY, "read", "-l", HOST, "-p", port, "-F", "0", "-S", "8192"]],
    }


def client_sessions(port: int, work: Path, name: str) -> list[Session]:
    def client(address: str) -> None:
        for command in nbd_clients(address)[name]:
            run(command, input=b"\xc3" * 2048, timeout=TIMEOUT, check=False)

    return recorded(port, work, client)


def nbd_server_seeds(corpus: Corpus, work: Path) -> None:
    source = serve(image(work, "serve.img"), "--lockspace", "none")
    try:
        for name in nbd_clients("127.0.0.1:0"):
            sessions = client_sessions(source.port, work, name)
            for i, session in enumerate(sessions):
                suffix = f"-{i}" if len(sessions) > 1 else ""
                corpus.write("nbd_server", name + suffix, bytes([SERVER_PLAIN, 0]) + session.sent)
    finally:
        source.stop()
    migration = migrate(work, flexnbd=False)
    corpus.write("nbd_server", "ferry-mirror", bytes([SERVER_MIGRATION, 0]) + migration.sent)
    corpus.write("nbd_server", "ferry-proxy", bytes([SERVER_EXTRAS, 0]) + proxied(work).sent)


def proxied(work: Path) -> Session:
    """What ``ferry proxy`` sends a ``ferry serve`` while nbdinfo asks through it, recorded.

    The export is "disk", which nbd_server's locator says has moved.
    """
    source = serve(image(work, "proxied.img"), "--name", "disk", "--lockspace", "none")

    def through_proxy(address: str) -> None:
        upstream = ["--conn-addr", HOST, "--conn-port", port_of(address), "--name", "disk"]
        front = ProxyProcess(["proxy", "-l", HOST, "-p", "0", *upstream]).wait_serving()
        try:
            run(["nbdinfo", front.uri()], timeout=TIMEOUT)
        finally:
            front.stop()

    try:
        (session, *_) = recorded(source.port, work, through_proxy)
        return session
    finally:
        source.stop()


def migrate(work: Path, *, flexnbd: bool) -> Session:
    """``ferry mirror`` from a ``ferry serve`` into a ``ferry listen``, recorded."""
    mode = "flexnbd" if flexnbd else "ferry"
    target = sparse_file(work / f"target-{mode}.img", SIZE)
    oldstyle = ["--oldstyle"] if flexnbd else []
    dest = FerryProcess(
        ["listen", "-l", HOST, "-p", "0", "-f", str(target), "--lockspace", "none", *oldstyle]
    ).wait_serving()
    sock = work / f"source-{mode}.sock"
    source = serve(image(work, f"source-{mode}.img"), "--sock", str(sock), "--lockspace", "none")
    try:
        extra = ["--action", "nothing", "--wait", *(["--flexnbd"] if flexnbd else [])]

        def mirror(address: str) -> None:
            run(mirror_command(int(port_of(address)), sock, *extra), timeout=120)

        (session, *_) = recorded(dest.port, work, mirror)
        return session
    finally:
        source.stop()
        dest.stop()


def nbd_oldstyle_seeds(corpus: Corpus, work: Path) -> None:
    source = serve(image(work, "oldstyle.img"), "--oldstyle", "--lockspace", "none")
    try:
        for name in ("nbdinfo", "qemu-io", "nbdsh"):
            (session, *_) = client_sessions(source.port, work, name)
            corpus.write("nbd_oldstyle", name, bytes([OLDSTYLE_SERVED, 0]) + session.sent)
    finally:
        source.stop()
    migration = migrate(work, flexnbd=True)
    corpus.write(
        "nbd_oldstyle", "ferry-mirror-flexnbd", bytes([OLDSTYLE_MIRROR_ONLY, 0]) + migration.sent
    )


# -- what NBD servers answer ----------------------------------------------------------------


def drive_client(port: int, config: int, script: bytes) -> bytes:
    """nbd_client's script against the server on ``port``, as an nbd_client input."""
    setup = nbd_client.Setup.from_byte(config)
    conn = setup.connect()
    handshake = bytearray()
    replies = bytearray()
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        failed = False
        while conn.negotiated is None and not failed:
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            handshake += data
            events = conn.receive_data(data)
            failed = any(isinstance(e, NegotiationFailed) for e in events)
        if conn.negotiated is not None:
            nbd_client.issue(conn, setup, script)
            sock.sendall(conn.data_to_send())
            # A server that breaks the protocol is a seed too: keep what it said.
            with contextlib.suppress(TimeoutError, ConnectionError, ProtocolError):
                while conn.in_flight():
                    data = sock.recv(65536)
                    if not data:
                        break
                    replies += data
                    conn.receive_data(data)
        with contextlib.suppress(OSError):
            sock.sendall(conn.data_to_send())
    head = bytes([config, 0]) + struct.pack(">H", len(handshake)) + handshake
    return head + bytes([len(script)]) + script + replies


def configs(*, oldstyle: bool) -> dict[str, int]:
    """The client configurations worth a seed: an oldstyle server hears no options."""
    if oldstyle:
        return {how: CLIENT_CONFIGS[how] for how in ("simple", "small-replies")}
    return CLIENT_CONFIGS


@contextlib.contextmanager
def peer(name: str, argv: Callable[[int], list[str]], work: Path) -> Iterator[int]:
    proc, port = start_peer(argv, work / f"{name}.log")
    try:
        yield port
    finally:
        stop_peer(proc)


def nbd_client_seeds(corpus: Corpus, work: Path) -> None:
    disk = image(work, "peer.img")
    nbdkit = ["nbdkit", "-f", "-i", HOST]
    peers: dict[str, Callable[[int], list[str]]] = {
        "nbdkit": lambda p: [*nbdkit, "-p", str(p), "memory", str(SIZE)],
        "nbdkit-oldstyle": lambda p: [*nbdkit, "-o", "-p", str(p), "memory", str(SIZE)],
        "qemu-nbd": lambda p: [
            *("qemu-nbd", "-f", "raw", "-t", "-e", "8", "-p", str(p), "-b", HOST, str(disk))
        ],
    }
    for name, argv in peers.items():
        with peer(name, argv, work) as port:
            for how, config in configs(oldstyle=name.endswith("oldstyle")).items():
                seed = drive_client(port, config, CLIENT_SCRIPT)
                corpus.write("nbd_client", f"{name}-{how}", seed)
    conf = work / "nbd-server.conf"

    def nbd_server(port: int) -> list[str]:
        conf.write_text(
            f"[generic]\nport = {port}\nlistenaddr = {HOST}\nallowlist = true\n"
            f"[disk]\nexportname = {disk}\ntrim = true\nflush = true\nfua = true\n"
        )
        return ["nbd-server", "-C", str(conf), "-d"]

    for how in ("structured", "simple"):  # -d: one client a process
        with peer("nbd-server", nbd_server, work) as port:
            config = CLIENT_CONFIGS[how] | 0x10  # the export named "disk"
            corpus.write(
                "nbd_client", f"nbd-server-{how}", drive_client(port, config, CLIENT_SCRIPT)
            )
    for mode in ("serve", "oldstyle"):
        extra = ["--oldstyle"] if mode == "oldstyle" else []
        proc = serve(image(work, f"client-{mode}.img"), "--lockspace", "none", *extra)
        try:
            for how, config in configs(oldstyle=mode == "oldstyle").items():
                seed = drive_client(proc.port, config, CLIENT_SCRIPT)
                corpus.write("nbd_client", f"ferry-{mode}-{how}", seed)
        finally:
            proc.stop()
    target = sparse_file(work / "client-listen.img", SIZE)
    dest = FerryProcess(
        ["listen", "-l", HOST, "-p", "0", "-f", str(target), "--lockspace", "none"]
    ).wait_serving()
    try:
        seed = drive_client(dest.port, CLIENT_CONFIGS["migrate"], CLIENT_SCRIPT)
        corpus.write("nbd_client", "ferry-listen-migrate", seed)
    finally:
        dest.stop()
    for name, port in handed_off(work):
        corpus.write("nbd_client", name, drive_client(port, CLIENT_LOCATE, CLIENT_SCRIPT))


def handed_off(work: Path) -> Iterator[tuple[str, int]]:
    """A ``ferry serve`` before and after it handed its image off (``--action nothing``)."""
    target = sparse_file(work / "located-target.img", SIZE)
    dest = FerryProcess(
        ["listen", "-l", HOST, "-p", "0", "-f", str(target), "--lockspace", "none"]
    ).wait_serving()
    sock = work / "located.sock"
    source = serve(image(work, "located.img"), "--sock", str(sock), "--lockspace", "none")
    try:
        yield "ferry-serve-locate", source.port
        run(mirror_command(dest.port, sock, "--action", "nothing", "--wait"), timeout=120)
        yield "ferry-handed-off-locate", source.port
    finally:
        source.stop()
        dest.stop()


# -- what control clients send ----------------------------------------------------------------


def control_seeds(corpus: Corpus, work: Path) -> None:
    sock = work / "control.sock"
    source = serve(image(work, "control.img"), "--sock", str(sock), "--lockspace", "none")
    try:
        commands: dict[str, Callable[[str], list[str]]] = {
            "status": lambda w: ["status", "--sock", w],
            "acl": lambda w: ["acl", "--sock", w, "10.0.0.0/8", "::1"],
            "break": lambda w: ["break", "--sock", w],
            "mirror-max-bps": lambda w: ["mirror-max-bps", "--sock", w, "1000"],
        }
        for name, argv in commands.items():

            def line_client(address: str, argv: Callable[[str], list[str]] = argv) -> None:
                run([*FERRY, *argv(address)], check=False, timeout=TIMEOUT)

            for session in recorded(sock, work, line_client):
                corpus.write("control_lines", name, b"\0" + session.sent)

        def events(address: str) -> None:
            with JsonControl(address) as control:
                control.subscribe()
                control.call("status")
                control.call("unsubscribe")

        for session in recorded(sock, work, events):
            corpus.write("control_json", "subscribe", b"\0" + session.sent)

        target = sparse_file(work / "control-target.img", SIZE)
        dest = FerryProcess(
            ["listen", "-l", HOST, "-p", "0", "-f", str(target), "--lockspace", "none"]
        ).wait_serving()

        def mirror(address: str) -> None:
            options = ("--max-downtime", "0.5", "--max-passes", "3", "--action", "nothing")
            run(mirror_command(dest.port, Path(address), *options, "--wait"), timeout=120)

        try:
            for session in recorded(sock, work, mirror):
                corpus.write("control_json", "ferry-mirror-wait", b"\0" + session.sent)
        finally:
            dest.stop()
    finally:
        source.stop()


def main(argv: list[str]) -> int:
    corpus = Corpus(set(argv) or set(TARGETS))
    os.environ.setdefault("PYTHONPATH", str(HERE.parent / "src"))
    with tempfile.TemporaryDirectory(prefix="ferry-seeds-") as tmp:
        work = Path(tmp)
        if corpus.wants("nbd_server"):
            nbd_server_seeds(corpus, work)
        if corpus.wants("nbd_oldstyle"):
            nbd_oldstyle_seeds(corpus, work)
        if corpus.wants("nbd_client"):
            nbd_client_seeds(corpus, work)
        if corpus.wants("control_lines") or corpus.wants("control_json"):
            control_seeds(corpus, work)
    for path in corpus.written:
        print(f"{path.relative_to(HERE.parent)}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
