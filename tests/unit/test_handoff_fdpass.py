"""SCM_RIGHTS with a versioned offer: what moves, what is refused before anything moves.

Both ends run in this process, on the two ends of a Unix socket pair, the
sender on a thread; the descriptors are pipes, so a descriptor that arrived
is proven to be the same open file by writing into the original pipe and
reading from the received end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from ferry.handoff import fdpass
from ferry.handoff.errors import HandoffError
from ferry.handoff.fdpass import FdPassError, Refused, receive_descriptors, send_descriptors

TIMEOUT = 30.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    made = [os.pipe() for _ in range(3)]
    yield made
    for r, w in made:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Sender(threading.Thread):
    """Runs ``send`` on a thread; ``outcome()`` is its return or its exception."""

    def __init__(self, send: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._send = send
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._send()
        except BaseException as error:
            self.error = error

    def outcome(self) -> BaseException | None:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the sender did not finish"
        return self.error


def open_files(fds: list[int]) -> set[tuple[int, int]]:
    return {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds}


@pytest.mark.parametrize("state", [b"", b"session state", os.urandom(3 << 20)], ids=len)
def test_descriptors_and_state_arrive_and_are_the_same_open_files(
    pair: tuple[socket.socket, socket.socket], pipes: list[tuple[int, int]], state: bytes
) -> None:
    readers = [r for r, _ in pipes]
    sender = Sender(lambda: send_descriptors(pair[0], readers, state, format=3, timeout=TIMEOUT))
    sender.start()
    received = receive_descriptors(pair[1], formats={1, 3}, timeout=TIMEOUT)
    assert sender.outcome() is None
    assert received.format == 3 and received.state == state
    assert open_files(received.fds) == open_files(readers)
    for fd in received.fds:
        assert os.get_inheritable(fd) is False  # close-on-exec
    for (_, w), fd in zip(pipes, received.fds, strict=True):
        os.write(w, b"through the passed descriptor")
        assert os.read(fd, 100) == b"through the passed descriptor"
        os.close(fd)


def test_an_unknown_format_is_refused_before_anything_moves(
    pair: tuple[socket.socket, socket.socket], pipes: list[tuple[int, int]]
) -> None:
    before = set(os.listdir("/proc/self/fd"))
    sender = Sender(
        lambda: send_descriptors(pair[0], [pipes[0][0]], b"v2 state", format=2, timeout=TIMEOUT)
    )
    sender.start()
    with pytest.raises(
        Refused, match=r"state format version 2 is not one this process reads \(1\)"
    ):
        receive_descriptors(pair[1], formats={1}, timeout=TIMEOUT)
    error = sender.outcome()
    assert isinstance(error, Refused) and isinstance(error, HandoffError)
    assert "version 2" in str(error)
    # Nothing moved: no descriptor appeared, and nothing more is in the socket.
    assert set(os.listdir("/proc/self/fd")) == before
    pair[1].setblocking(False)
    with pytest.raises(BlockingIOError):
        pair[1].recv(1)


@pytest.mark.parametrize(
    ("count", "state_size", "limits", "message"),
    [
        (3, 10, {"max_fds": 2}, "3 descriptors offered; this process takes 1 to 2"),
        (1, 5000, {"max_state": 4096}, "a state of 5000 bytes is over this process's limit"),
    ],
)
def test_an_offer_over_the_receivers_limits_is_refused(
    pair: tuple[socket.socket, socket.socket],
    pipes: list[tuple[int, int]],
    count: int,
    state_size: int,
    limits: dict[str, int],
    message: str,
) -> None:
    fds = [r for r, _ in pipes][:count]
    sender = Sender(
        lambda: send_descriptors(pair[0], fds, bytes(state_size), format=1, timeout=TIMEOUT)
    )
    sender.start()
    with pytest.raises(Refused, match=message):
        receive_descriptors(pair[1], formats={1}, timeout=TIMEOUT, **limits)
    assert isinstance(sender.outcome(), Refused)


def test_another_exchange_protocol_or_garbage_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[0].sendall(struct.pack(">4sHHHQ", b"FRYF", 99, 1, 1, 0))
    with pytest.raises(Refused, match="exchange version 99 is not supported"):
        receive_descriptors(pair[1], formats={1}, timeout=TIMEOUT)
    status, length = struct.unpack(">BH", pair[0].recv(3))
    assert status == 1 and b"version 99" in pair[0].recv(length)
    pair[0].sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(FdPassError, match="not a descriptor offer"):
        receive_descriptors(pair[1], formats={1}, timeout=TIMEOUT)


def test_a_sender_that_vanishes_or_goes_quiet_is_an_error_not_a_hang(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[0].sendall(b"FRYF\x00")
    with pytest.raises(FdPassError, match="timed out"):
        receive_descriptors(pair[1], formats={1}, timeout=0.2)
    pair[0].close()
    with pytest.raises(FdPassError, match="closed the connection"):
        receive_descriptors(pair[1], formats={1}, timeout=TIMEOUT)


def test_a_receiver_that_vanishes_after_the_offer_is_an_error_for_the_sender(
    pair: tuple[socket.socket, socket.socket], pipes: list[tuple[int, int]]
) -> None:
    def receiver_dies() -> None:
        pair[1].recv(18)  # the offer
        pair[1].close()

    thread = threading.Thread(target=receiver_dies, daemon=True)
    thread.start()
    with pytest.raises(FdPassError, match="closed the connection"):
        send_descriptors(pair[0], [pipes[0][0]], b"state", format=1, timeout=TIMEOUT)
    thread.join(TIMEOUT)


def test_the_sender_checks_its_own_arguments(
    pair: tuple[socket.socket, socket.socket], pipes: list[tuple[int, int]]
) -> None:
    with pytest.raises(FdPassError, match="one message carries 1 to 253"):
        send_descriptors(pair[0], [], b"", format=1, timeout=TIMEOUT)
    with pytest.raises(FdPassError, match="not a u16"):
        send_descriptors(pair[0], [pipes[0][0]], b"", format=1 << 16, timeout=TIMEOUT)
    assert fdpass.MAX_FDS == 253


def test_notes_follow_an_exchange_both_ways(pair: tuple[socket.socket, socket.socket]) -> None:
    fdpass.send_note(pair[0], b"r", timeout=TIMEOUT)
    fdpass.send_note(pair[1], b"n", "a reason: " + "é" * 10, timeout=TIMEOUT)
    assert fdpass.receive_note(pair[1], timeout=TIMEOUT) == (b"r", "")
    assert fdpass.receive_note(pair[0], timeout=TIMEOUT) == (b"n", "a reason: " + "é" * 10)
    with pytest.raises(ValueError, match="one byte"):
        fdpass.send_note(pair[0], b"rr", timeout=TIMEOUT)


def test_a_quiet_peer_is_a_timeout_and_a_gone_one_is_not(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A takeover tells the two apart: silence may mean the peer is busy; a close is an end."""
    with pytest.raises(fdpass.FdPassTimeout, match="timed out"):
        fdpass.receive_note(pair[1], timeout=0.1)
    pair[0].close()
    with pytest.raises(FdPassError, match="closed the connection") as info:
        fdpass.receive_note(pair[1], timeout=TIMEOUT)
    assert not isinstance(info.value, fdpass.FdPassTimeout)
