"""What a ``mirror`` command asks for, and what it is answered: the source's vocabulary.

flexnbd's replies are kept word for word (its tooling matches them); the
options carry ferry's defaults.  Nothing here does anything: the driver is
:mod:`ferry.migrate.source`.
"""

from __future__ import annotations

import enum
import shlex
from dataclasses import dataclass
from typing import Final

from ferry.migrate.core.backoff import INITIAL_DELAY, MAX_DELAY
from ferry.migrate.core.convergence import DEFAULT_MAX_DOWNTIME, DEFAULT_MAX_PASSES
from ferry.migrate.core.passes import DEFAULT_MAX_DATA_LENGTH
from ferry.migrate.core.stats import FailureReason

__all__ = [
    "CANCELLED",
    "COPY_MODES",
    "FAILED_TO_CONNECT",
    "LEASE_LOST",
    "MIRROR_STARTED",
    "NO_HELLO",
    "REASON_OF_REPLY",
    "REJECTED",
    "SIZE_MISMATCH",
    "CannotBreak",
    "CopyMode",
    "Destination",
    "FinishAction",
    "MirrorError",
    "MirrorOptions",
    "MirrorResult",
    "NotMirroring",
    "StartOutcome",
    "parse_destination",
]

# flexnbd's replies to `mirror`, word for word (the control command prints them).
MIRROR_STARTED: Final = "Mirror started"
FAILED_TO_CONNECT: Final = "Mirror failed to connect"
NO_HELLO: Final = "Remote server failed to respond"
REJECTED: Final = "Mirror was rejected"
SIZE_MISMATCH: Final = "Remote size does not match local size"
CANCELLED: Final = "Mirror was cancelled"
LEASE_LOST: Final = "Mirror failed: the lease was lost"
#: The counted reason (``ferry_migration_*_total{reason}``) of a failure that
#: carries one of flexnbd's replies; the other failures name their own.
REASON_OF_REPLY: Final = {
    FAILED_TO_CONNECT: FailureReason.CONNECT,
    NO_HELLO: FailureReason.NO_HELLO,
    REJECTED: FailureReason.REJECTED,
    SIZE_MISMATCH: FailureReason.SIZE_MISMATCH,
}

#: Requests and data bytes unanswered at once: enough to keep a fast link
#: busy across a round trip, small enough to bound the transport's buffer.
#: The request count matters for dirty passes (a 4 KiB WRITE each): the
#: more replies one read brings back, the more WRITEs one ``sendmsg`` sends.
DEFAULT_MAX_IN_FLIGHT: Final = 512
DEFAULT_MAX_BYTES_IN_FLIGHT: Final = 32 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_HELLO_TIMEOUT: Final = 5.0
DEFAULT_REPLY_TIMEOUT: Final = 60.0


class MirrorError(Exception):
    """A control request the mirror cannot do in its state; ``str`` is the reason."""


class NotMirroring(MirrorError):
    """``break`` / ``mirror_max_bps`` when the job has already ended."""


class CannotBreak(MirrorError):
    """``break`` once the commit may have landed, or while the lease is taken back."""


class FinishAction(enum.Enum):
    """What the source does with itself once the destination owns the image (flexnbd's)."""

    EXIT = "exit"
    UNLINK = "unlink"
    NOTHING = "nothing"


class CopyMode(enum.Enum):
    """How client writes reach the destination while a migration runs (QEMU's ``copy-mode``).

    ``background``: a write marks the dirty map and a later pass copies it;
    under writes faster than the stream the passes only converge with
    auto-converge's throttle.  ``write-blocking``: a write to a region the
    migration has already copied is acknowledged only once it is on the
    destination too (:mod:`ferry.migrate.mirroring`), so the dirty set only
    shrinks, at the cost of each such write's round trip.
    """

    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


#: What ``--copy-mode`` and the ``copy_mode`` param take, for their error messages.
COPY_MODES: Final = " or ".join(f"'{mode.value}'" for mode in CopyMode)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to mirror to, over one of three transports (QEMU's names):

    * TCP: ``host`` (a name or an address) and ``port``, from ``bind`` if given;
    * ``unix:PATH``: the listener's Unix socket ``path`` (``ferry listen --nbd-sock``);
    * ``exec:COMMAND``: the stream over the stdin and stdout of ``command``
      (an argv), typically ``ssh HOST ferry listen --stdio ...``.

    The protocol, the two-phase commit and the lease's hand-over are the
    same on each; only how the connection is made differs
    (:mod:`ferry.migrate.transport`).
    """

    host: str = ""
    port: int = 0
    bind: str | None = None
    export_name: str = ""
    path: str | None = None
    command: tuple[str, ...] = ()

    @property
    def transport(self) -> str:
        """``tcp``, ``unix`` or ``exec``."""
        if self.path is not None:
            return "unix"
        return "exec" if self.command else "tcp"

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.command:
            return f"exec:{shlex.join(self.command)}"
        return f"{self.host}:{self.port}"


#: What ``parse_destination`` takes, for its error messages.
DESTINATION_FORMS: Final = "tcp:HOST:PORT, unix:PATH or exec:COMMAND"
#: The longest Unix socket path the kernel takes (``sun_path`` less its NUL).
MAX_UNIX_PATH: Final = 107


def parse_destination(text: str) -> Destination:
    """``tcp:HOST:PORT``, ``unix:PATH`` or ``exec:COMMAND`` as a :class:`Destination`.

    ``COMMAND`` is split as a shell would split it, but no shell runs it.
    Raises ``ValueError`` with one line saying what is wrong.
    """
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in ("tcp", "unix", "exec"):
        raise ValueError(f"bad destination {text!r}: expected {DESTINATION_FORMS}")
    if scheme == "unix":
        if not rest or "\0" in rest:
            raise ValueError(f"bad destination {text!r}: unix: needs a socket path")
        if len(rest.encode()) > MAX_UNIX_PATH:
            raise ValueError(
                f"bad destination {text!r}: a Unix socket path has at most {MAX_UNIX_PATH} bytes"
            )
        return Destination(path=rest)
    if scheme == "exec":
        try:
            argv = tuple(shlex.split(rest))
        except ValueError as error:
            raise ValueError(f"bad destination {text!r}: {error}") from None
        if not argv:
            raise ValueError(f"bad destination {text!r}: exec: needs a command")
        return Destination(command=argv)
    host, colon, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad destination {text!r}: tcp: needs HOST:PORT, PORT in 1..65535")
    return Destination(host, int(port))


@dataclass(frozen=True, slots=True)
class MirrorOptions:
    """Everything a ``mirror`` command can say, with ferry's defaults."""

    max_bps: int | None = None
    max_downtime: float = DEFAULT_MAX_DOWNTIME
    max_passes: int = DEFAULT_MAX_PASSES
    action: FinishAction = FinishAction.EXIT  # flexnbd's default
    fencing_token: int = 0  # the commit's token without a lease
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    max_data_length: int = DEFAULT_MAX_DATA_LENGTH
    retry_initial: float = INITIAL_DELAY
    retry_max: float = MAX_DELAY
    destination_empty: bool = False
    flexnbd: bool = False  # the destination is a flexnbd listener: its stream and handoff
    # The retry policy: give up after this many lost attempts, or once attempts
    # have been lost for this long (seconds); None: retry for ever.
    max_retries: int | None = None
    retry_for: float | None = None
    copy_mode: CopyMode = CopyMode.BACKGROUND

    def __post_init__(self) -> None:
        if self.copy_mode is CopyMode.WRITE_BLOCKING and self.flexnbd:
            raise ValueError(
                "copy mode write-blocking needs a ferry or NBD destination: flexnbd's stream "
                "has one request in flight at a time"
            )
        for name in ("connect_timeout", "hello_timeout", "reply_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if self.retry_for is not None and not self.retry_for > 0:
            raise ValueError("retry_for must be positive")
        if self.max_in_flight < 1 or self.max_bytes_in_flight < 1 or self.max_data_length < 1:
            raise ValueError("in-flight limits and max_data_length must be positive")


@dataclass(frozen=True, slots=True)
class StartOutcome:
    """How the first negotiation went: what ``mirror`` answers.

    ``message`` is flexnbd's reply text; ``detail`` says why, for logs.
    ``plain_target``: the destination is an NBD server without ferry's
    migration extension (a mirror, no handoff).
    """

    ok: bool
    message: str
    detail: str = ""
    plain_target: bool = False

    @property
    def reply(self) -> str:
        """The control socket's reply line: ``0: Mirror started`` or ``1: ...``."""
        return f"{0 if self.ok else 1}: {self.message}"


@dataclass(frozen=True, slots=True)
class MirrorResult:
    """How the job ended: the migration chart's final state, and whether the image left."""

    state: str
    handed_off: bool
    reason: str = ""
