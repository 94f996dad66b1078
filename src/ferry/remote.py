"""A small blocking NBD client on a plain socket, for the CLI and for tests.

``ferry read`` / ``ferry write`` and the integration tests need to talk to any
NBD server (ferry, qemu-nbd, nbdkit, nbd-server) without a reactor, so this
wraps the sans-IO ``ClientConnection`` in the simplest loop that still keeps
a few requests in flight: one request at a time would make every large copy
pay a round trip per 32 MiB.

Not thread-safe: one ``RemoteExport`` per thread.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import (
    BASE_ALLOCATION,
    MAX_REQUEST_SIZE,
    Command,
    CommandFlag,
    Errno,
    OptionReply,
    TransmissionFlag,
)
from ferry.nbd.events import (
    Event,
    Extent,
    Negotiated,
    NegotiationFailed,
    ProtocolError,
    Reply,
    StartTLS,
)

__all__ = [
    "NegotiationError",
    "RemoteError",
    "RemoteExport",
    "UnsupportedCommand",
]

# Bounds on pipelining: enough to keep a loopback or LAN link busy, small
# enough that the replies we have not read yet fit in the socket buffers (so
# a server writing replies never blocks while we are still sending).
MAX_REQUESTS_IN_FLIGHT: Final = 16
MAX_BYTES_IN_FLIGHT: Final = 64 * 1024 * 1024

# Commands without a payload (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) may
# cover more than the max block size, but the length field is a u32; 1 GiB
# steps stay clear of it and of servers that dislike huge ranges.
MAX_EFFECT_LENGTH: Final = 1 << 30

_RECV_SIZE: Final = 1 << 20
_NO_FLAGS: Final = CommandFlag(0)


class RemoteError(Exception):
    """The server answered a request with an error."""

    def __init__(self, errno: Errno, message: str = "") -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return f"{self.errno.name}: {self.message}" if self.message else self.errno.name


class UnsupportedCommand(RemoteError):
    """The server did not advertise what the call needs, so nothing was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(Errno.ENOTSUP, message)


class NegotiationError(Exception):
    """The server refused the handshake (no such export, shutting down, TLS needed...)."""

    def __init__(self, error: OptionReply, message: str) -> None:
        super().__init__(error, message)
        self.error = error
        self.message = message

    def __str__(self) -> str:
        return f"{self.error.name}: {self.message}"


@dataclass(frozen=True, slots=True)
class _Job:
    command: Command
    offset: int
    length: int
    flags: CommandFlag = _NO_FLAGS
    data: memoryview | None = None


def _spans(offset: int, length: int, step: int) -> Iterator[tuple[int, int]]:
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        yield offset, n
        offset += n


class _Channel:
    """The socket and the protocol state of one connection, moved together."""

    def __init__(self, sock: socket.socket, conn: ClientConnection, peer: str) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.closed = False

    def send(self) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            self.abandon()
            raise TimeoutError(f"{self.peer} did not take our data in time") from exc
        except OSError as exc:
            self.abandon()
            raise ConnectionError(f"sending to {self.peer} failed: {exc}") from exc

    def events(self) -> list[Event]:
        """Block until the server's bytes make at least one event."""
        while True:
            try:
                data = self.sock.recv(_RECV_SIZE)
            except TimeoutError as exc:
                self.abandon()
                raise TimeoutError(f"{self.peer} sent no answer in time") from exc
            except OSError as exc:
                self.abandon()
                raise ConnectionError(f"receiving from {self.peer} failed: {exc}") from exc
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as exc:
                self.abandon()
                if not data:  # a hang-up at the wrong moment is a connection problem
                    raise ConnectionError(f"{self.peer}: {exc}") from exc
                raise
            self.send()  # the handshake answers option replies without an event
            if events:
                return events
            if not data:
                self.abandon()
                raise ConnectionError(f"{self.peer} closed the connection")

    def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        """STARTTLS was acknowledged: the TLS handshake (``host`` must be in the server's
        certificate), then the rest of the negotiation over it."""
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=host)
        except TimeoutError as exc:
            self.abandon()
            raise TimeoutError(f"{self.peer}: no TLS handshake in time") from exc
        except OSError as exc:  # ssl.SSLError and its certificate errors are OSErrors
            self.abandon()
            raise ConnectionError(f"TLS with {self.peer} failed: {exc}") from exc
        self.conn.tls_started()
        self.send()

    def abandon(self) -> None:
        self.closed = True
        self.sock.close()


class RemoteExport:
    """One negotiated connection to one export.  Use ``connect``."""

    def __init__(self, channel: _Channel, negotiated: Negotiated) -> None:
        self._channel = channel
        self._conn = channel.conn
        self._peer = channel.peer
        self._negotiated = negotiated
        # Split large I/O at the advertised maximum, never above what ferry
        # and most servers accept without saying (32 MiB), and in whole
        # minimum blocks so a server with 512-byte blocks gets aligned pieces.
        minimum = negotiated.min_block_size
        step = min(negotiated.max_block_size, MAX_REQUEST_SIZE, self._conn.max_reply_size - 8)
        self._io_step = max(step - step % minimum, minimum)
        self._effect_step = MAX_EFFECT_LENGTH - MAX_EFFECT_LENGTH % minimum

    # -- connecting ------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        export_name: str = "",
        bind: str | tuple[str, int] | None = None,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> RemoteExport:
        """Connect, negotiate and return the export ready for requests.

        ``bind`` is the local address to connect from (flexnbd's mirror BIND).
        ``timeout`` bounds each blocking step (connect, one send, one receive).
        ``tls``: insist on TLS (STARTTLS first), checking the server's
        certificate against ``host``.
        """
        source = (bind, 0) if isinstance(bind, str) else bind
        peer = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to NBD server {peer}: {exc}") from exc
        return cls.from_socket(
            sock, export_name=export_name, timeout=timeout, peer=peer, tls=tls, host=host
        )

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        *,
        export_name: str = "",
        timeout: float | None = 30.0,
        peer: str | None = None,
        meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
        tls: ssl.SSLContext | None = None,
        host: str = "",
    ) -> RemoteExport:
        """Negotiate over a socket already connected (a socketpair, a Unix socket...).

        The socket is owned by the result, and closed if negotiation fails.
        With ``tls``, ``host`` is the name the server's certificate must carry.
        """
        conn = ClientConnection(export_name, meta_contexts=meta_contexts, tls=tls is not None)
        channel = _Channel(sock, conn, "")
        try:
            sock.settimeout(timeout)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel.peer = peer or str(sock.getpeername() or "NBD server")
            while True:
                for event in channel.events():
                    if isinstance(event, StartTLS):
                        assert tls is not None  # only a client that asked is told to start
                        channel.start_tls(tls, host or channel.peer.rpartition(":")[0])
                    if isinstance(event, NegotiationFailed):
                        channel.send()  # the ABORT that ends the session politely
                        raise NegotiationError(event.error, event.message)
                    if isinstance(event, Negotiated):
                        return cls(channel, event)
        except BaseException:
            channel.abandon()
            raise

    # -- what the handshake said -------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The connected socket, for a caller that speaks raw NBD past this client.

        Tests use it to pipeline requests or send garbage; after that, this
        object's own bookkeeping no longer matches the stream.
        """
        return self._channel.sock

    @property
    def negotiated(self) -> Negotiated:
        return self._negotiated

    @property
    def size(self) -> int:
        return self._negotiated.size

    @property
    def flags(self) -> TransmissionFlag:
        return TransmissionFlag(self._negotiated.transmission_flags)

    def __repr__(self) -> str:
        state = "closed" if self._channel.closed else "open"
        return f"<RemoteExport {self._peer} size={self.size} {state}>"

    # -- commands ---------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        jobs = [_Job(Command.READ, o, n) for o, n in _spans(offset, length, self._io_step)]
        for job, reply in zip(jobs, self._run(jobs), strict=True):
            rel = job.offset - offset
            out[rel : rel + job.length] = reply.data
        return bytes(out)

    def pwrite(self, data: bytes, offset: int, *, fua: bool = False) -> None:
        flags = self._need_flags(fua=fua)
        view = memoryview(data).cast("B")
        jobs = [
            _Job(Command.WRITE, o, n, flags, view[o - offset : o - offset + n])
            for o, n in _spans(offset, len(view), self._io_step)
        ]
        self._run(jobs)

    def flush(self) -> None:
        self._need(TransmissionFlag.SEND_FLUSH, "FLUSH")
        self._run([_Job(Command.FLUSH, 0, 0)])

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._need(TransmissionFlag.SEND_TRIM, "TRIM")
        self._effect(Command.TRIM, offset, length, self._need_flags(fua=fua))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        self._need(TransmissionFlag.SEND_WRITE_ZEROES, "WRITE_ZEROES")
        flags = self._need_flags(fua=fua)
        if no_hole:
            flags |= CommandFlag.NO_HOLE
        if fast_zero:
            self._need(TransmissionFlag.SEND_FAST_ZERO, "FAST_ZERO")
            flags |= CommandFlag.FAST_ZERO
        self._effect(Command.WRITE_ZEROES, offset, length, flags)

    def cache(self, offset: int, length: int) -> None:
        self._need(TransmissionFlag.SEND_CACHE, "CACHE")
        self._effect(Command.CACHE, offset, length, _NO_FLAGS)

    def block_status(
        self, offset: int, length: int, *, context: str = BASE_ALLOCATION
    ) -> list[Extent]:
        """The extents of ``[offset, offset+length)``, merged where flags repeat.

        A server may describe less than was asked; we ask again from where it
        stopped until the whole range is described.
        """
        context_id = self._negotiated.meta_contexts.get(context)
        if context_id is None:
            raise UnsupportedCommand(f"{self._peer} did not agree to meta context {context!r}")
        extents: list[Extent] = []
        position, end = offset, offset + length
        while position < end:
            ask = min(end - position, self._effect_step)
            (reply,) = self._run([_Job(Command.BLOCK_STATUS, position, ask)])
            described = 0
            for extent in reply.extents.get(context_id, ()):
                n = min(extent.length, ask - described)
                if n <= 0:
                    break
                described += n
                if extents and extents[-1].flags == extent.flags:
                    extents[-1] = Extent(extents[-1].length + n, extent.flags)
                else:
                    extents.append(Extent(n, extent.flags))
            if described == 0:
                self._channel.abandon()
                raise ProtocolError(f"{self._peer} described nothing for meta context {context!r}")
            position += described
        return extents

    def close(self) -> None:
        """Send NBD_CMD_DISC (the soft disconnect the spec asks for) and close."""
        if self._channel.closed:
            return
        try:
            if self._conn.in_flight() == 0:
                self._conn.request(Command.DISC)
                self._channel.send()
                self._channel.sock.shutdown(socket.SHUT_WR)
        except (OSError, RuntimeError):
            pass  # the server is gone already; there is nothing left to tell it
        finally:
            self._channel.abandon()

    def __enter__(self) -> RemoteExport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    def _need(self, flag: TransmissionFlag, what: str) -> None:
        if not self._negotiated.transmission_flags & flag:
            raise UnsupportedCommand(f"{self._peer} does not advertise {what}")

    def _need_flags(self, *, fua: bool) -> CommandFlag:
        if not fua:
            return _NO_FLAGS
        self._need(TransmissionFlag.SEND_FUA, "FUA")
        return CommandFlag.FUA

    def _effect(self, command: Command, offset: int, length: int, flags: CommandFlag) -> None:
        self._run(
            [_Job(command, o, n, flags) for o, n in _spans(offset, length, self._effect_step)]
        )

    def _run(self, jobs: Sequence[_Job]) -> list[Reply]:
        """Send ``jobs`` with a bounded window; their replies, in job order.

        On an error reply nothing more is sent, the replies already owed are
        collected (so the connection stays usable), and the error of the
        earliest failed job is raised.
        """
        if self._channel.closed:
            raise ConnectionError(f"connection to {self._peer} is closed")
        replies: list[Reply | None] = [None] * len(jobs)
        index_of: dict[int, int] = {}
        next_job = 0
        bytes_in_flight = 0
        failed = False
        while True:
            while (
                next_job < len(jobs)
                and not failed
                and len(index_of) < MAX_REQUESTS_IN_FLIGHT
                and (
                    not index_of
                    or bytes_in_flight + self._weight(jobs[next_job]) <= MAX_BYTES_IN_FLIGHT
                )
            ):
                job = jobs[next_job]
                data = b"" if job.data is None else bytes(job.data)
                handle = self._conn.request(
                    job.command, job.offset, job.length, flags=job.flags, data=data
                )
                index_of[handle] = next_job
                bytes_in_flight += self._weight(job)
                next_job += 1
            self._channel.send()
            if not index_of:
                break
            for event in self._channel.events():
                if not isinstance(event, Reply):
                    continue
                i = index_of.pop(event.handle)
                bytes_in_flight -= self._weight(jobs[i])
                replies[i] = event
                failed = failed or event.error != Errno.OK
        done = [r for r in replies if r is not None]
        for reply in done:
            if reply.error != Errno.OK:
                if reply.error == Errno.ESHUTDOWN:
                    self.close()  # the spec: a client told ESHUTDOWN must disconnect
                raise RemoteError(reply.error, reply.message)
        return done

    @staticmethod
    def _weight(job: _Job) -> int:
        return job.length if job.command in (Command.READ, Command.WRITE) else 0
