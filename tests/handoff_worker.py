"""The processes of the connection-handoff tests and benchmark: an echo client and server.

Run as ``python tests/handoff_worker.py client|server ...`` (``--help``),
usually inside a network namespace (``ip netns exec``).  Everything a worker
has to say is one JSON object per line on stdout; the test drives it with
one command per line on stdin.  Nothing here sleeps to synchronise: the
loops wait on their sockets and stdin with ``select``.

The protocol is a sequence-numbered echo.  The client sends, on every
connection, a 16-byte message every ``--interval`` seconds -- the
connection's number, the message's sequence number and a check word -- and
the server sends every whole message back.  The client checks each echo is
the next one it expects, byte for byte: a lost, duplicated, reordered or
damaged byte anywhere, in either direction, is reported, as is any error
on the socket (a reset).  It also records its sockets' addresses when they
connect and when it stops: a connection that moved must still be the same
one, at the same local port, never reconnected.

client commands:  ``stop``  stop sending, wait for the outstanding echoes,
                            print ``done`` with the verdict and exit.
server commands:  ``handoff``  freeze, checkpoint and release every
                               connection (TCP_REPAIR), remove the service
                               address if given, print ``states``;
                  ``unfreeze`` lift this process's freeze (same network
                               namespace: after the destination restored);
                  ``pass``     hand every connection to ``--pass-to`` by
                               SCM_RIGHTS (``passed`` or ``refused``);
                  ``restore JSON``  (with ``--restore``) restore the states
                               of a ``states`` line and serve them;
                  ``exit``     close everything and exit 0.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ferry.handoff import address, fdpass, tcp_repair
from ferry.handoff.freeze import Flow, Freezer
from ferry.handoff.tcp_state import SocketState

MESSAGE = struct.Struct(">IQI")  # connection, sequence, check word
CHECK = 0x5EED5EED
#: Echoes each connection must have had before the client says it started,
#: and the restored server says it is serving the moved connections.
WARMUP = 20
FD_FORMAT = 1


class Commands:
    """Whole lines from stdin, read without Python's buffering so ``select`` sees them all."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.buffer = b""
        self.eof = False

    def read(self) -> list[str]:
        """The lines that are complete after one read (call when stdin is readable)."""
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            self.eof = True
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode().strip() for line in lines]


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def check_word(conn: int, seq: int) -> int:
    return (CHECK ^ conn * 2654435761 ^ seq * 40503) & 0xFFFFFFFF


# -- the client -------------------------------------------------------------------------


@dataclass
class ClientConnection:
    number: int
    sock: socket.socket
    local: tuple[str, int]
    peer: tuple[str, int]
    sent: int = 0
    echoed: int = 0
    buffer: bytes = b""
    last_echo: float = 0.0
    longest_gap: float = 0.0
    errors: list[str] = field(default_factory=list)


def client(args: argparse.Namespace) -> int:
    host, port = args.connect.rsplit(":", 1)
    deadline = time.monotonic() + args.connect_timeout
    conns = []
    for number in range(args.clients):
        while True:
            try:
                sock = socket.create_connection((host, int(port)), timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                select.select([], [], [], 0.05)  # the server is starting: retry
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local, peer = sock.getsockname(), sock.getpeername()
        conns.append(ClientConnection(number, sock, local[:2], peer[:2]))
    by_fd = {c.sock.fileno(): c for c in conns}
    commands = Commands()
    started = stopping = False
    stop_by = 0.0
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if not stopping and now >= next_send:
            for c in conns:
                if not c.errors:
                    send_message(c)
            next_send = now + args.interval
        if not started and all(c.echoed >= WARMUP for c in conns):
            started = True
            say("started", local=[list(c.local) for c in conns])
        outstanding = any(c.echoed < c.sent and not c.errors for c in conns)
        if stopping and (not outstanding or now > stop_by):
            break
        wait = max(0.0, next_send - now) if not stopping else max(0.0, stop_by - now)
        watched = [fd for fd, c in by_fd.items() if not c.errors]
        readable, _, _ = select.select([*watched, commands.fd], [], [], wait)
        for fd in readable:
            if fd == commands.fd:
                if "stop" in commands.read() or commands.eof:
                    stopping = True
                    stop_by = time.monotonic() + args.drain_timeout
                continue
            receive_echoes(by_fd[fd])
    verdict = []
    for c in conns:
        try:
            same = (c.sock.getsockname()[:2], c.sock.getpeername()[:2]) == (c.local, c.peer)
        except OSError as error:
            same = False
            c.errors.append(f"addresses: {error}")
        if c.echoed != c.sent and not c.errors:
            c.errors.append(f"{c.sent - c.echoed} echoes missing")
        verdict.append(
            {
                "sent": c.sent,
                "echoed": c.echoed,
                "same_connection": same,
                "local": list(c.local),
                "longest_gap": c.longest_gap,
                "errors": c.errors,
            }
        )
        c.sock.close()
    say("done", connections=verdict)
    return 0


def send_message(c: ClientConnection) -> None:
    message = MESSAGE.pack(c.number, c.sent, check_word(c.number, c.sent))
    try:
        sent = c.sock.send(message)
    except BlockingIOError:
        return  # the socket buffer is full (a long stall): send it next time
    except OSError as error:
        c.errors.append(f"send: {error}")
        return
    if sent != len(message):  # never for 16 bytes into a non-full buffer
        c.errors.append(f"short send of {sent} bytes")
        return
    if not c.sent:
        c.last_echo = time.monotonic()
    c.sent += 1


def receive_echoes(c: ClientConnection) -> None:
    try:
        data = c.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError as error:
        c.errors.append(f"recv: {error}")
        return
    if not data:
        c.errors.append("the server closed the connection")
        return
    now = time.monotonic()
    c.longest_gap = max(c.longest_gap, now - c.last_echo)
    c.last_echo = now
    c.buffer += data
    while len(c.buffer) >= MESSAGE.size and not c.errors:
        number, seq, word = MESSAGE.unpack_from(c.buffer)
        c.buffer = c.buffer[MESSAGE.size :]
        if (number, seq, word) != (c.number, c.echoed, check_word(c.number, c.echoed)):
            c.errors.append(f"echo {c.echoed}: got connection {number} seq {seq} word {word:#x}")
            return
        c.echoed += 1


# -- the server -------------------------------------------------------------------------


@dataclass
class ServerConnection:
    sock: socket.socket
    partial: bytes = b""  # the start of a message not yet echoed: the app's own state
    echoed: int = 0
    since_mark: int = 0  # echoed since the last move (or refused move)


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conns: dict[int, ServerConnection] = {}
        self.freezer = Freezer(args.freeze_table) if args.freeze_table else None
        self.service = address.ServiceAddress.parse(args.service) if args.service else None
        self.announcer = address.Announcer(self.service) if args.announce else None
        self.listener: socket.socket | None = None
        self.waiting_for = 0
        self.moved = False  # connections arrived by a move; not yet reported warm

    def run(self) -> int:
        args = self.args
        if args.listen:
            host, port = args.listen.rsplit(":", 1)
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, int(port)))
            self.listener.listen(128)
            self.waiting_for = args.clients
        if args.take_from:
            self.take(args.take_from)
        else:
            say("ready")
        commands = Commands()
        while True:
            fds: list[Any] = [commands.fd, *self.conns]
            if self.listener is not None and self.waiting_for:
                fds.append(self.listener)
            readable, _, _ = select.select(fds, [], [])
            for fd in readable:
                if fd == commands.fd:
                    lines = commands.read()
                    if commands.eof or not all(self.command(line) for line in lines):
                        self.close()
                        return 0
                elif fd is self.listener:
                    sock, _ = self.listener.accept()
                    self.add(ServerConnection(sock))
                    self.waiting_for -= 1
                elif fd in self.conns:
                    self.serve(self.conns[fd])
            self.report_warm()

    def add(self, conn: ServerConnection) -> None:
        conn.sock.setblocking(False)
        self.conns[conn.sock.fileno()] = conn

    def serve(self, conn: ServerConnection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            say("error", what=f"recv: {error}")
            self.drop(conn)
            return
        if not data:
            self.drop(conn)
            return
        buffer = conn.partial + data
        whole = len(buffer) - len(buffer) % MESSAGE.size
        conn.partial = buffer[whole:]
        if whole:
            conn.sock.setblocking(True)  # an echo never waits long: the client reads
            conn.sock.sendall(buffer[:whole])
            conn.sock.setblocking(False)
            conn.echoed += whole // MESSAGE.size
            conn.since_mark += whole // MESSAGE.size

    def drop(self, conn: ServerConnection) -> None:
        del self.conns[conn.sock.fileno()]
        conn.sock.close()
        say("closed", echoed=conn.echoed)

    def mark(self) -> None:
        """A move happened (or was refused): report when every connection has echoed since."""
        for conn in self.conns.values():
            conn.since_mark = 0
        self.moved = True

    def report_warm(self) -> None:
        """Say ``serving-moved`` once every connection has echoed WARMUP messages since the mark."""
        conns = self.conns.values()
        if self.moved and conns and all(c.since_mark >= WARMUP for c in conns):
            self.moved = False
            say("serving-moved", connections=len(self.conns))

    def command(self, line: str) -> bool:
        word, _, rest = line.partition(" ")
        if word == "handoff":
            self.handoff()
        elif word == "unfreeze":
            assert self.freezer is not None
            self.freezer.close()
            say("unfrozen")
        elif word == "restore":
            self.restore(json.loads(rest))
        elif word == "move":
            self.move(queues=rest == "queues")
        elif word == "pass":
            self.pass_descriptors()
        elif word == "exit":
            return False
        else:
            say("error", what=f"unknown command {line!r}")
        return True

    # -- TCP_REPAIR ------------------------------------------------------------------

    def handoff(self) -> None:
        assert self.freezer is not None
        start = time.perf_counter()
        conns = list(self.conns.values())
        flows = [Flow.of_socket(c.sock) for c in conns]
        self.freezer.freeze(*flows)
        frozen = time.perf_counter()
        states = []
        for conn in conns:
            states.append(
                {
                    "tcp": b64(tcp_repair.checkpoint(conn.sock).to_bytes()),
                    "app": b64(conn.partial),
                }
            )
        checkpointed = time.perf_counter()
        for conn in conns:
            tcp_repair.release(conn.sock)
        self.conns.clear()
        if self.service is not None:
            address.remove(self.service)
        done = time.perf_counter()
        say(
            "states",
            states=states,
            freeze=frozen - start,
            checkpoint=checkpointed - frozen,
            release=done - checkpointed,
            total=done - start,
        )

    def move(self, *, queues: bool) -> None:
        """Checkpoint every connection and restore it in this process, on a new socket.

        With ``queues``, first let each connection's receive queue fill with
        two messages or more, then, frozen, read and echo one message: the
        checkpoint then holds bytes in both queues (the echo sent but its
        ACK dropped by the freeze).
        """
        assert self.freezer is not None
        conns = list(self.conns.values())
        if queues:
            for conn in conns:
                wait_for_queue(conn.sock, 2 * MESSAGE.size)
        start = time.perf_counter()
        flows = [Flow.of_socket(c.sock) for c in conns]
        self.freezer.freeze(*flows)
        if queues:
            for conn in conns:
                conn.sock.setblocking(True)
                data = conn.sock.recv(MESSAGE.size - len(conn.partial))
                conn.partial += data
                if len(conn.partial) == MESSAGE.size:
                    conn.sock.sendall(conn.partial)
                    conn.echoed += 1
                    conn.partial = b""
        states = [tcp_repair.checkpoint(c.sock) for c in conns]
        checkpointed = time.perf_counter()
        for conn in conns:
            del self.conns[conn.sock.fileno()]
            tcp_repair.release(conn.sock)
        restored = time.perf_counter()
        for conn, state in zip(conns, states, strict=True):
            self.add(ServerConnection(tcp_repair.restore(state), conn.partial))
        self.freezer.unfreeze(*flows)
        done = time.perf_counter()
        self.mark()
        say(
            "moved",
            connections=len(states),
            queues=[[len(s.recv_queue), len(s.send_queue), s.unsent] for s in states],
            same_address=[
                list(c.sock.getsockname()[:2]) == list(s.local)
                for c, s in zip(self.conns.values(), states, strict=True)
            ],
            checkpoint=checkpointed - start,
            restore=done - restored,
            total=done - start,
        )

    def restore(self, states: list[dict[str, str]]) -> None:
        start = time.perf_counter()
        decoded = [SocketState.from_bytes(unb64(s["tcp"])) for s in states]
        flows = [Flow(s.local, s.peer) for s in decoded]
        if self.freezer is not None:
            self.freezer.freeze(*flows)
        added = address.add(self.service) if self.service is not None else False
        restored = []
        for state, raw in zip(decoded, states, strict=True):
            sock = tcp_repair.restore(state, freebind=True)
            restored.append(ServerConnection(sock, partial=unb64(raw["app"])))
        built = time.perf_counter()
        if self.freezer is not None:
            self.freezer.unfreeze(*flows)
        if self.announcer is not None:
            self.announcer.announce(count=2)
        done = time.perf_counter()
        for conn in restored:
            self.add(conn)
        self.mark()
        say(
            "restored",
            connections=len(restored),
            address_added=added,
            restore=built - start,
            total=done - start,
            local=[list(c.sock.getsockname()[:2]) for c in restored],
            peers=[list(c.sock.getpeername()[:2]) for c in restored],
        )

    # -- SCM_RIGHTS ------------------------------------------------------------------

    def pass_descriptors(self) -> None:
        conns = list(self.conns.values())
        state = json.dumps([b64(c.partial) for c in conns]).encode()
        start = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as link:
            link.connect(self.args.pass_to)
            try:
                fdpass.send_descriptors(
                    link,
                    [c.sock.fileno() for c in conns],
                    state,
                    format=self.args.fd_format,
                    timeout=10.0,
                )
            except fdpass.Refused as refused:
                self.mark()
                say("refused", reason=str(refused))
                return
        for conn in conns:
            conn.sock.close()
        self.conns.clear()
        say("passed", connections=len(conns), seconds=time.perf_counter() - start)

    def take(self, path: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            say("ready")
            link, _ = listener.accept()
        with link:
            try:
                received = fdpass.receive_descriptors(link, formats=self.args.formats, timeout=10.0)
            except fdpass.Refused as refused:
                say("refused", reason=str(refused))
                raise SystemExit(0) from None
        partials = json.loads(received.state)
        for fd, partial in zip(received.fds, partials, strict=True):
            self.add(ServerConnection(socket.socket(fileno=fd), partial=unb64(partial)))
        self.mark()
        say("taken", connections=len(received.fds))

    def close(self) -> None:
        for conn in self.conns.values():
            conn.sock.close()
        if self.freezer is not None:
            self.freezer.close()
        if self.announcer is not None:
            self.announcer.close()


def wait_for_queue(sock: socket.socket, size: int, timeout: float = 10.0) -> None:
    """Wait until ``size`` bytes wait unread in ``sock``'s receive queue (the client sends)."""
    deadline = time.monotonic() + timeout
    while unread(sock) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {size} bytes arrived in {timeout} s")
        select.select([], [], [], 0.0005)  # polls a kernel counter until the deadline


def unread(sock: socket.socket) -> int:
    (size,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), tcp_repair.SIOCINQ, bytes(4)))
    return int(size)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    c = roles.add_parser("client")
    c.add_argument("--connect", required=True, help="IP:PORT")
    c.add_argument("--clients", type=int, default=1)
    c.add_argument("--interval", type=float, default=0.002)
    c.add_argument("--connect-timeout", type=float, default=20.0)
    c.add_argument("--drain-timeout", type=float, default=20.0)
    s = roles.add_parser("server")
    s.add_argument("--listen", help="IP:PORT to accept --clients connections on")
    s.add_argument("--clients", type=int, default=1)
    s.add_argument("--restore", action="store_true", help="serve restored connections")
    s.add_argument("--freeze-table", help="this process's nftables freeze table")
    s.add_argument("--service", help="IP/PREFIX@DEV: removed at handoff, added at restore")
    s.add_argument("--announce", action="store_true", help="gratuitous ARP after a restore")
    s.add_argument("--pass-to", help="Unix socket to pass connections to on 'pass'")
    s.add_argument("--fd-format", type=int, default=FD_FORMAT)
    s.add_argument("--take-from", help="Unix socket to take connections from, at start")
    s.add_argument("--formats", type=int, nargs="+", default=[FD_FORMAT])
    args = parser.parse_args()
    if args.role == "client":
        return client(args)
    return Server(args).run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
