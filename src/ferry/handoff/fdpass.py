"""Hand live file descriptors and a state message to another process on this host.

For a takeover on the same host (an upgrade, a restart) a connection need
not be checkpointed at all: ``SCM_RIGHTS`` gives the other process the very
same kernel socket, queues, sequence numbers and all, and the client cannot
tell.  What must travel beside it is the application's state (for ferry,
the NBD sessions and what the descriptors are), and the receiver must be
able to say "I do not understand that state" *before* anything moves, so the
old process simply serves on.

The exchange, over a connected ``AF_UNIX`` stream socket::

    sender                                   receiver
    offer: magic, protocol, format,   --->
           fd count, state length
                                      <---   verdict: accept, or refuse + reason
    state bytes, fds (SCM_RIGHTS)     --->   (only after an accept)
                                      <---   receipt: "I hold them"

:func:`send_descriptors` returns only after the receipt, so the sender
knows when it may close its own copies; a refusal raises :class:`Refused`
with the receiver's reason, and nothing was sent.  :func:`receive_descriptors`
refuses a format it does not read, too many descriptors, or too much state,
before accepting.  The fds arrive close-on-exec.  Every wait has a
deadline; a peer that goes quiet is an :class:`FdPassTimeout` (an
:class:`FdPassError`), not a hang.

When the two have more to settle after the exchange (a takeover's "ready",
"yours", "serving"), they trade *notes* on the same socket
(:func:`send_note`, :func:`receive_note`): a kind byte and a short text.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final

from ferry.handoff.errors import HandoffError

__all__ = [
    "FdPassError",
    "FdPassTimeout",
    "Offer",
    "Received",
    "Refused",
    "receive_descriptors",
    "receive_note",
    "send_descriptors",
    "send_note",
]

#: The version of the exchange itself (not of the state it carries).
PROTOCOL_VERSION: Final = 1
#: Linux's SCM_MAX_FD: the most descriptors one message may carry.
MAX_FDS: Final = 253
#: The default cap on the state message a receiver accepts.
MAX_STATE_BYTES: Final = 256 * 1024 * 1024

_MAGIC: Final = b"FRYF"
_OFFER: Final = struct.Struct(">4sHHHQ")  # magic, protocol, format, fd count, state length
_VERDICT: Final = struct.Struct(">BH")  # 0 accept / 1 refuse, reason length
_RECEIPT: Final = b"\x00"
_ACCEPT: Final = 0
_REFUSE: Final = 1
_CHUNK: Final = 1 << 20
_NOTE: Final = struct.Struct(">cH")  # kind, text length


class FdPassError(HandoffError):
    """The exchange failed: the peer vanished, went quiet, or sent something malformed."""


class Refused(FdPassError):
    """The receiver refused the offer (its reason is the message); nothing was sent."""


class FdPassTimeout(FdPassError):
    """The peer said nothing before the deadline: it may be slow, stopped or gone."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What a sender proposes: ``fds`` descriptors and ``state_size`` bytes of ``format``."""

    format: int
    fds: int
    state_size: int


@dataclass(frozen=True, slots=True)
class Received:
    """What arrived: the state message and the descriptors, in the order they were sent."""

    format: int
    state: bytes
    fds: list[int]


def send_descriptors(
    sock: socket.socket,
    fds: Sequence[int],
    state: bytes,
    *,
    format: int,
    timeout: float,
) -> None:
    """Offer ``fds`` with ``state`` (of version ``format``); send them if the receiver accepts.

    Returns when the receiver has confirmed it holds them.  Raises
    :class:`Refused` (nothing sent) or :class:`FdPassError`.
    """
    if not 0 < len(fds) <= MAX_FDS:
        raise FdPassError(f"{len(fds)} descriptors: one message carries 1 to {MAX_FDS}")
    if not 0 <= format < 1 << 16:
        raise FdPassError(f"state format {format} is not a u16")
    deadline = time.monotonic() + timeout
    _send(sock, _OFFER.pack(_MAGIC, PROTOCOL_VERSION, format, len(fds), len(state)), deadline)
    status, length = _VERDICT.unpack(_recv_exactly(sock, _VERDICT.size, deadline))
    reason = _recv_exactly(sock, length, deadline).decode(errors="replace")
    if status == _REFUSE:
        raise Refused(reason or "the receiver refused the offer")
    if status != _ACCEPT:
        raise FdPassError(
            f"the receiver answered the offer with {status}, neither accept nor refuse"
        )
    # The descriptors ride on the first byte(s) of the state, or on one
    # byte of their own when there is no state to carry them.
    first = state[:_CHUNK] or b"\0"
    _settimeout(sock, deadline)
    try:
        sent = socket.send_fds(sock, [first], list(fds))
    except OSError as error:
        raise FdPassError(f"sending the descriptors failed: {error}") from error
    if sent < len(state):
        _send(sock, state[sent:], deadline)  # never an empty send: the peer may be done
    elif not state and sent != 1:
        raise FdPassError("the descriptors' carrier byte was not sent")
    if _recv_exactly(sock, len(_RECEIPT), deadline) != _RECEIPT:
        raise FdPassError("the receiver's receipt is malformed")


def receive_descriptors(
    sock: socket.socket,
    *,
    formats: Collection[int],
    timeout: float,
    max_fds: int = MAX_FDS,
    max_state: int = MAX_STATE_BYTES,
) -> Received:
    """Take an offer if its state format is one of ``formats`` and it is within the limits.

    A refusal is told to the sender with its reason and raised here as
    :class:`Refused`; nothing moved.  Descriptors received are closed again
    if the exchange fails after they arrived.
    """
    deadline = time.monotonic() + timeout
    magic, protocol, format, count, size = _OFFER.unpack(_recv_exactly(sock, _OFFER.size, deadline))
    if magic != _MAGIC:
        raise FdPassError(f"not a descriptor offer (magic {magic!r})")
    reason = _judge(Offer(format, count, size), protocol, formats, max_fds, max_state)
    if reason is not None:
        raw = reason.encode()[:0xFFFF]
        _send(sock, _VERDICT.pack(_REFUSE, len(raw)) + raw, deadline)
        raise Refused(reason)
    _send(sock, _VERDICT.pack(_ACCEPT, 0), deadline)
    fds: list[int] = []
    try:
        first_size = min(size, _CHUNK) or 1
        _settimeout(sock, deadline)
        try:
            data, fds, flags = _recv_with_fds(sock, first_size, count)
        except OSError as error:
            raise FdPassError(f"receiving the descriptors failed: {error}") from error
        if flags & socket.MSG_CTRUNC:
            raise FdPassError("the descriptors were truncated (the sender sent more than offered)")
        if len(fds) != count:
            raise FdPassError(f"{len(fds)} descriptors arrived, {count} were offered")
        if not data:
            raise FdPassError("the sender closed the connection before the descriptors")
        state = data + _recv_exactly(sock, size - len(data), deadline) if size else b""
        _send(sock, _RECEIPT, deadline)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Received(format, state, list(fds))


def send_note(sock: socket.socket, kind: bytes, text: str = "", *, timeout: float) -> None:
    """Send one note: ``kind`` (one byte) and ``text`` (at most 65535 bytes of UTF-8)."""
    if len(kind) != 1:
        raise ValueError(f"a note's kind is one byte, not {kind!r}")
    raw = text.encode()[:0xFFFF]
    _send(sock, _NOTE.pack(kind, len(raw)) + raw, time.monotonic() + timeout)


def receive_note(sock: socket.socket, *, timeout: float) -> tuple[bytes, str]:
    """The next note: its kind and its text.

    :class:`FdPassTimeout` if none came in time; :class:`FdPassError` if
    the peer closed the connection (or it broke) instead.
    """
    deadline = time.monotonic() + timeout
    kind, length = _NOTE.unpack(_recv_exactly(sock, _NOTE.size, deadline))
    text = _recv_exactly(sock, length, deadline).decode(errors="replace")
    return kind, text


def _recv_with_fds(sock: socket.socket, size: int, count: int) -> tuple[bytes, list[int], int]:
    """``recvmsg`` with room for ``count`` descriptors, which arrive close-on-exec.

    Not ``socket.recv_fds``: before Python 3.12 it drops its ``flags``
    argument, so MSG_CMSG_CLOEXEC never reaches the kernel.
    """
    fds = array.array("i")
    space = socket.CMSG_SPACE(count * fds.itemsize)
    data, ancillary, flags, _ = sock.recvmsg(size, space, socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return data, list(fds), flags


def _judge(
    offer: Offer, protocol: int, formats: Collection[int], max_fds: int, max_state: int
) -> str | None:
    if protocol != PROTOCOL_VERSION:
        return (
            f"descriptor exchange version {protocol} is not supported "
            f"(this process speaks version {PROTOCOL_VERSION})"
        )
    if offer.format not in formats:
        readable = ", ".join(str(f) for f in sorted(formats)) or "none"
        return f"state format version {offer.format} is not one this process reads ({readable})"
    if not 0 < offer.fds <= max_fds:
        return f"{offer.fds} descriptors offered; this process takes 1 to {max_fds}"
    if offer.state_size > max_state:
        return f"a state of {offer.state_size} bytes is over this process's limit of {max_state}"
    return None


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FdPassTimeout("the descriptor exchange ran out of time")
    sock.settimeout(remaining)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    _settimeout(sock, deadline)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise FdPassTimeout("timed out: the peer took nothing before the deadline") from None
    except OSError as error:
        raise FdPassError(f"the descriptor exchange failed while sending: {error}") from error


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        _settimeout(sock, deadline)
        try:
            chunk = sock.recv(min(size - len(buffer), _CHUNK))
        except TimeoutError:
            raise FdPassTimeout("timed out: the peer said nothing before the deadline") from None
        except OSError as error:
            raise FdPassError(f"the descriptor exchange failed while receiving: {error}") from error
        if not chunk:
            raise FdPassError(
                f"the peer closed the connection {size - len(buffer)} bytes short of a message"
            )
        buffer += chunk
    return bytes(buffer)
