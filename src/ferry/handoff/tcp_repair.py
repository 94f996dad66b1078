"""Checkpoint a live TCP socket into a :class:`SocketState`, and restore one on a new socket.

Linux's ``TCP_REPAIR`` mode lets a process read a connection's sequence
numbers, queues and negotiated options out of a socket, close it without a
packet, and build a socket elsewhere that carries on the same connection:
the peer sees a pause, not a reset.  CRIU's ``libsoccr`` has the same shape
(one plain state, a save and a restore); the facts below were measured on
this kind of machine (``HANDOFF.md``).

Checkpoint, on the socket being moved -- the order matters:

1. The caller has already *frozen* the connection
   (:mod:`ferry.handoff.freeze`): repair mode does not stop the kernel from
   accepting and acknowledging incoming bytes, and a byte ACKed after the
   queues are read is lost for good.
2. ``TCP_REPAIR=1``; then ``TCP_INFO`` (must be ESTABLISHED -- a half-closed
   or closing connection is refused), the queue sizes (``SIOCOUTQ``,
   ``SIOCOUTQNSD``, ``SIOCINQ``), ``TCP_MAXSEG``, ``TCP_TIMESTAMP``,
   ``TCP_REPAIR_WINDOW``.
3. The receive queue, then the send queue: select it, read its
   ``TCP_QUEUE_SEQ``, and peek ``len + 1`` bytes (exactly ``len`` must come).

The socket is left in repair mode: :func:`release` closes it without a
packet once the state is safe elsewhere (never ``shutdown()`` it: that
queues a FIN), :func:`resume` turns repair off if the move is abandoned and
this process keeps the connection.

Restore, on a new socket (:func:`restore`):

1. ``socket()``, ``TCP_MAXSEG`` (capped at 32767, what the kernel accepts;
   without it the first segments are 524 bytes), buffers large enough for the
   queues, then ``TCP_REPAIR=1`` -- before ``bind``, and no ``SO_REUSEADDR``
   after it (that breaks the forced port reuse repair mode does).
2. ``bind`` the original local address (when asked, for an address not yet
   local: ``IP_FREEBIND`` for the bind and ``IP_TRANSPARENT`` for the route
   ``connect`` looks up, which otherwise fails with ENETUNREACH), set each
   queue's sequence number (only possible before ``connect``), ``connect``
   the peer: no SYN goes out, the socket is ESTABLISHED.  In the same
   network namespace this fails with EADDRNOTAVAIL while the old socket
   exists: release it first.
3. ``TCP_REPAIR_OPTIONS`` (SACK, window scales, timestamps, MSS), then
   ``TCP_TIMESTAMP`` -- without it the peer's PAWS check drops our segments
   and the connection hangs.
4. Re-inject the receive queue, then the part of the send queue that had
   been sent, then ``TCP_REPAIR_WINDOW`` (after the queues: before, it is
   EINVAL with a non-empty receive queue).
5. ``TCP_REPAIR=0``, then send the never-sent bytes the ordinary way, and
   re-apply ``TCP_NODELAY``.

Every failure before the state is complete is a :class:`RepairError`
saying which step and why; a socket that failed to restore is closed while
still in repair mode, so it never sends a packet.  Only IPv4 and IPv6 TCP
sockets are handled, with the addresses the kernel reports (an IPv6
link-local peer, which needs a scope id, is not).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import socket
import struct
from collections.abc import Callable
from typing import Final, TypeVar

from ferry.handoff.errors import HandoffError
from ferry.handoff.tcp_state import RepairWindow, SocketState

__all__ = [
    "CheckpointFailed",
    "NotEstablished",
    "RepairError",
    "RepairNotPermitted",
    "RepairUnsupported",
    "RestoreFailed",
    "SocketState",
    "checkpoint",
    "enter_repair",
    "release",
    "restore",
    "resume",
]

# Python's socket module has none of these (linux/tcp.h, linux/sockios.h).
TCP_REPAIR: Final = 19
TCP_REPAIR_QUEUE: Final = 20
TCP_QUEUE_SEQ: Final = 21
TCP_REPAIR_OPTIONS: Final = 22
TCP_TIMESTAMP: Final = 24
TCP_REPAIR_WINDOW: Final = 29
TCP_NO_QUEUE: Final = 0
TCP_RECV_QUEUE: Final = 1
TCP_SEND_QUEUE: Final = 2
TCPOPT_MSS: Final = 2
TCPOPT_WINDOW: Final = 3
TCPOPT_SACK_PERM: Final = 4
TCPOPT_TIMESTAMP: Final = 8
TCPI_OPT_TIMESTAMPS: Final = 1
TCPI_OPT_SACK: Final = 2
TCPI_OPT_WSCALE: Final = 4
SIOCINQ: Final = 0x541B
SIOCOUTQ: Final = 0x5411
SIOCOUTQNSD: Final = 0x894B
IP_FREEBIND: Final = 15
IPV6_FREEBIND: Final = 78
IP_TRANSPARENT: Final = 19
IPV6_TRANSPARENT: Final = 75
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33

TCP_ESTABLISHED: Final = 1
#: tcp_states.h, for the message that refuses a socket.
TCP_STATE_NAMES: Final = (
    "(none)",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
)

_INT: Final = struct.Struct("i")
_U32: Final = struct.Struct("I")
_WINDOW: Final = struct.Struct("5I")  # struct tcp_repair_window
_REPAIR_OPT: Final = struct.Struct("II")  # struct tcp_repair_opt: code, value
_TCP_INFO_SIZE: Final = 104  # more than the 8 leading bytes read; the kernel copies what fits
#: setsockopt(TCP_MAXSEG) refuses more than MAX_TCP_WINDOW.
_MAX_SETTABLE_MSS: Final = 32767
#: The largest write re-injected into a queue at once: the kernel copies a
#: repair-mode receive queue into one linear buffer and may refuse a large
#: one with ENOMEM, so bigger queues go in pieces (halved on ENOMEM).
_INJECT_CHUNK: Final = 256 * 1024
_MIN_INJECT_CHUNK: Final = 1024
#: How long sending the never-sent tail may block: it fitted the old
#: socket's buffer, so it fits the new one's; the bound is against a bug.
_UNSENT_TIMEOUT: Final = 5.0


class RepairError(HandoffError):
    """A socket that cannot be checkpointed or restored; ``step`` names where it failed."""

    def __init__(self, message: str, step: str = "") -> None:
        super().__init__(message)
        self.step = step


class NotEstablished(RepairError):
    """Only ESTABLISHED connections move: not listening, connecting, half-closed or closing ones."""


class RepairNotPermitted(RepairError):
    """``TCP_REPAIR`` needs CAP_NET_ADMIN in the user namespace owning the network namespace."""


class RepairUnsupported(RepairError):
    """The kernel has no ``TCP_REPAIR`` (built without CONFIG_CHECKPOINT_RESTORE?)."""


class CheckpointFailed(RepairError):
    """A read from a socket in repair mode failed; the socket was taken out of repair mode."""


class RestoreFailed(RepairError):
    """A step of a restore failed; the new socket was closed without sending anything."""


# -- checkpoint -------------------------------------------------------------------


def checkpoint(sock: socket.socket) -> SocketState:
    """Put ``sock`` in repair mode and read its whole state; freeze its packets first.

    Refuses early, leaving the socket as it was: anything but an IPv4/IPv6
    stream socket (:class:`RepairError`), a connection that is not
    ESTABLISHED (:class:`NotEstablished`), no permission or no kernel
    support (:class:`RepairNotPermitted`, :class:`RepairUnsupported`).  A
    failure once in repair mode turns repair off again before raising
    :class:`CheckpointFailed`, so the caller still has a working socket to
    disconnect or keep.  On success the socket stays in repair mode: hand it
    to :func:`release` or :func:`resume`.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise RepairError(f"not a TCP socket (family {sock.family}, type {sock.type})", "check")
    state, _, _ = _tcp_info(sock, "check")
    if state != TCP_ESTABLISHED:
        raise NotEstablished(f"the connection is {_state_name(state)}, not ESTABLISHED", "check")
    enter_repair(sock, "repair on")
    try:
        return _read_state(sock)
    except BaseException:
        _leave_repair_quietly(sock)
        raise


def _read_state(sock: socket.socket) -> SocketState:
    state, options, scales = _tcp_info(sock, "tcp info")
    if state != TCP_ESTABLISHED:  # it changed between the check and repair mode
        raise NotEstablished(f"the connection is {_state_name(state)}, not ESTABLISHED", "tcp info")
    fd = sock.fileno()
    send_len = _call(CheckpointFailed, "send queue size", lambda: _ioctl_int(fd, SIOCOUTQ))
    unsent = _call(CheckpointFailed, "unsent size", lambda: _ioctl_int(fd, SIOCOUTQNSD))
    recv_len = _call(CheckpointFailed, "receive queue size", lambda: _ioctl_int(fd, SIOCINQ))
    mss = _call(
        CheckpointFailed,
        "mss",
        lambda: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),
    )
    timestamp = 0
    if options & TCPI_OPT_TIMESTAMPS:
        raw = _call(
            CheckpointFailed,
            "timestamp",
            lambda: sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, _U32.size),
        )
        (timestamp,) = _U32.unpack(raw)
    raw = _call(
        CheckpointFailed,
        "window",
        lambda: sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size),
    )
    window = RepairWindow(*_WINDOW.unpack(raw))
    recv_seq, recv_queue = _read_queue(sock, TCP_RECV_QUEUE, recv_len, "receive queue")
    send_seq, send_queue = _read_queue(sock, TCP_SEND_QUEUE, send_len, "send queue")
    _setopt(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue", kind=CheckpointFailed)
    nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    local = sock.getsockname()
    peer = sock.getpeername()
    snd_wscale, rcv_wscale = (scales & 0xF, scales >> 4) if options & TCPI_OPT_WSCALE else (0, 0)
    return SocketState(
        family=sock.family,
        local=(local[0], local[1]),
        peer=(peer[0], peer[1]),
        send_seq=send_seq,
        recv_seq=recv_seq,
        send_queue=send_queue,
        unsent=min(unsent, len(send_queue)),
        recv_queue=recv_queue,
        mss=mss,
        options=options,
        snd_wscale=snd_wscale,
        rcv_wscale=rcv_wscale,
        timestamp=timestamp,
        window=window,
        nodelay=nodelay,
    )


def _read_queue(sock: socket.socket, queue: int, length: int, name: str) -> tuple[int, bytes]:
    """A queue's ``TCP_QUEUE_SEQ`` and its bytes, peeked (the queue is left as it is)."""
    _setopt(sock, TCP_REPAIR_QUEUE, queue, f"select {name}", kind=CheckpointFailed)
    raw = _call(
        CheckpointFailed,
        f"{name} seq",
        lambda: sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _U32.size),
    )
    (seq,) = _U32.unpack(raw)
    if not length:
        return seq, b""
    # One byte more than the size says: exactly `length` must come back.
    data = _call(
        CheckpointFailed,
        f"read {name}",
        lambda: sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT),
    )
    if len(data) != length:
        raise CheckpointFailed(
            f"the {name} held {len(data)} bytes, its size said {length}", f"read {name}"
        )
    return seq, data


def _tcp_info(sock: socket.socket, step: str) -> tuple[int, int, int]:
    """``TCP_INFO``'s state, options mask and packed window scales."""
    raw = _call(
        RepairError,
        step,
        lambda: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE),
    )
    if len(raw) < 7:
        raise RepairError(f"TCP_INFO returned {len(raw)} bytes", step)
    return raw[0], raw[5], raw[6]


def _state_name(state: int) -> str:
    if 0 <= state < len(TCP_STATE_NAMES):
        return TCP_STATE_NAMES[state]
    return f"state {state}"


# -- after a checkpoint -------------------------------------------------------------


def release(sock: socket.socket) -> None:
    """Close a checkpointed socket without a packet: its connection lives on elsewhere.

    In repair mode the kernel drops the socket silently (no FIN, no RST,
    whatever ``SO_LINGER`` says).  Closing the last descriptor is what
    counts: a descriptor duplicated elsewhere (a Twisted transport's socket
    object) must be closed too, and never with ``shutdown()``.
    """
    sock.close()


def resume(sock: socket.socket) -> None:
    """Take a checkpointed socket out of repair mode: this process keeps the connection.

    For a move abandoned after the checkpoint while the old socket is still
    open; the kernel sends a window probe, and the connection carries on.
    """
    _setopt(sock, TCP_REPAIR, 0, "repair off", kind=RepairError)


def enter_repair(sock: socket.socket, step: str) -> None:
    """Put ``sock`` in repair mode, or raise RepairNotPermitted or RepairUnsupported."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except OSError as error:
        if error.errno == errno.EPERM:
            raise RepairNotPermitted(
                "TCP_REPAIR refused: this process lacks CAP_NET_ADMIN in the user namespace "
                "that owns its network namespace",
                step,
            ) from error
        if error.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            raise RepairUnsupported(
                f"TCP_REPAIR is not supported by this kernel ({error.strerror})", step
            ) from error
        raise RepairError(f"TCP_REPAIR failed: {error.strerror}", step) from error


def _leave_repair_quietly(sock: socket.socket) -> None:
    # Already failing: the caller disconnects this socket anyway.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)


# -- restore ---------------------------------------------------------------------


def restore(state: SocketState, *, freebind: bool = False) -> socket.socket:
    """A new, blocking socket carrying on the connection ``state`` describes.

    The old socket must be gone (:func:`release`) if it lived in this
    network namespace, and the peer's packets frozen until this returns.
    ``freebind`` lets the local address be one this host does not have
    yet (``IP_FREEBIND`` and ``IP_TRANSPARENT``), for a destination that
    adds the service address after restoring.  Raises :class:`RepairNotPermitted`,
    :class:`RepairUnsupported` or :class:`RestoreFailed`; on any failure
    the new socket is closed in repair mode, so the peer sees nothing.
    """
    sock = socket.socket(state.family, socket.SOCK_STREAM)
    in_repair = False
    try:
        _setopt(sock, socket.TCP_MAXSEG, min(state.mss, _MAX_SETTABLE_MSS), "mss")
        _size_buffers(sock, state)
        enter_repair(sock, "repair on")
        in_repair = True
        _restore_connection(sock, state, freebind)
        _restore_queues(sock, state)
        window = state.window
        packed = _WINDOW.pack(
            window.snd_wl1, window.snd_wnd, window.max_window, window.rcv_wnd, window.rcv_wup
        )
        _setopt(sock, TCP_REPAIR_WINDOW, packed, "window")
        _setopt(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")
        _setopt(sock, TCP_REPAIR, 0, "repair off")
        in_repair = False
        _send_unsent(sock, state)
        if state.nodelay:
            _setopt(sock, socket.TCP_NODELAY, 1, "nodelay")
    except BaseException:
        if not in_repair:
            # Out of repair mode the connection is live: a close would send a
            # FIN or a reset the peer must not see.  Put it back first.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        sock.close()
        raise
    return sock


def _size_buffers(sock: socket.socket, state: SocketState) -> None:
    """Buffers that hold the queues: a default-sized one refuses a large re-injection.

    Only raised, never lowered, and only when a queue would not fit, so the
    kernel's autotuning stays on for the ordinary case.  The FORCE variants
    (CAP_NET_ADMIN, which a restore needs anyway) go past ``*mem_max``.
    """
    for queue, current, force in (
        (state.send_queue, socket.SO_SNDBUF, SO_SNDBUFFORCE),
        (state.recv_queue, socket.SO_RCVBUF, SO_RCVBUFFORCE),
    ):
        # The kernel reports twice what it was asked for (the other half is
        # bookkeeping); ask for twice the queue so the data fits with room.
        if 2 * len(queue) > sock.getsockopt(socket.SOL_SOCKET, current) // 2:
            _setopt(sock, force, 2 * len(queue), "buffers", level=socket.SOL_SOCKET)


def _restore_connection(sock: socket.socket, state: SocketState, freebind: bool) -> None:
    if freebind:
        # FREEBIND lets the bind take an address that is not local; the
        # route lookup in connect still checks the source address unless the
        # socket is also TRANSPARENT (CAP_NET_ADMIN, which repair needs too).
        level, foreign = (
            (socket.IPPROTO_IP, (IP_FREEBIND, IP_TRANSPARENT))
            if state.family == socket.AF_INET
            else (socket.IPPROTO_IPV6, (IPV6_FREEBIND, IPV6_TRANSPARENT))
        )
        for option in foreign:
            _setopt(sock, option, 1, "freebind", level=level)
    _call(RestoreFailed, "bind", lambda: sock.bind(state.local))
    mask = 0xFFFFFFFF
    for queue, seq, name in (
        (TCP_RECV_QUEUE, (state.recv_seq - len(state.recv_queue)) & mask, "receive"),
        (TCP_SEND_QUEUE, (state.send_seq - len(state.send_queue)) & mask, "send"),
    ):
        _setopt(sock, TCP_REPAIR_QUEUE, queue, f"select {name} queue")
        _setopt(sock, TCP_QUEUE_SEQ, _U32.pack(seq), f"{name} seq")
    _call(RestoreFailed, "connect", lambda: sock.connect(state.peer))
    options = [_REPAIR_OPT.pack(TCPOPT_MSS, state.mss)]
    if state.options & TCPI_OPT_SACK:
        options.append(_REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0))
    if state.options & TCPI_OPT_WSCALE:
        options.append(_REPAIR_OPT.pack(TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16))
    if state.options & TCPI_OPT_TIMESTAMPS:
        options.append(_REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0))
    _setopt(sock, TCP_REPAIR_OPTIONS, b"".join(options), "options")
    if state.options & TCPI_OPT_TIMESTAMPS:
        _setopt(sock, TCP_TIMESTAMP, _U32.pack(state.timestamp), "timestamp")


def _restore_queues(sock: socket.socket, state: SocketState) -> None:
    sent = len(state.send_queue) - state.unsent
    for queue, data, name in (
        (TCP_RECV_QUEUE, state.recv_queue, "receive queue"),
        (TCP_SEND_QUEUE, state.send_queue[:sent], "send queue"),
    ):
        if not data:
            continue
        _setopt(sock, TCP_REPAIR_QUEUE, queue, f"select {name}")
        _inject(sock, data, name)


def _inject(sock: socket.socket, data: bytes, name: str) -> None:
    """Write ``data`` into the selected queue, in pieces that shrink when the kernel says ENOMEM."""
    view = memoryview(data)
    chunk = _INJECT_CHUNK
    while view:
        try:
            written = sock.send(view[:chunk])
        except OSError as error:
            if error.errno == errno.ENOMEM and chunk > _MIN_INJECT_CHUNK:
                chunk //= 2
                continue
            raise RestoreFailed(
                f"re-injecting the {name} failed with {len(view)} bytes left: {error.strerror}",
                f"inject {name}",
            ) from error
        if written <= 0:
            raise RestoreFailed(f"the {name} took no bytes", f"inject {name}")
        view = view[written:]


def _send_unsent(sock: socket.socket, state: SocketState) -> None:
    if not state.unsent:
        return
    sock.settimeout(_UNSENT_TIMEOUT)
    try:
        sock.sendall(state.send_queue[len(state.send_queue) - state.unsent :])
    except OSError as error:
        raise RestoreFailed(
            f"sending the {state.unsent} never-sent bytes failed: {error}", "send unsent"
        ) from error
    finally:
        sock.settimeout(None)


# -- small syscall helpers ---------------------------------------------------------

_T = TypeVar("_T")


def _call(kind: type[RepairError], step: str, operation: Callable[[], _T]) -> _T:
    """Run one syscall; an OSError becomes ``kind`` naming the step and the errno."""
    try:
        return operation()
    except OSError as error:
        raise kind(f"{step}: {error.strerror or error}", step) from error


def _setopt(
    sock: socket.socket,
    option: int,
    value: int | bytes,
    step: str,
    *,
    kind: type[RepairError] = RestoreFailed,
    level: int = socket.IPPROTO_TCP,
) -> None:
    _call(kind, step, lambda: sock.setsockopt(level, option, value))


def _ioctl_int(fd: int, request: int) -> int:
    (value,) = _INT.unpack(fcntl.ioctl(fd, request, bytes(_INT.size)))
    return int(value)
