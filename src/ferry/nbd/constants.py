"""Numbers of the NBD protocol, named as the specification names them.

Source: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
Only what ferry speaks is here; the names drop the ``NBD_`` prefix because
the module already says it.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

# -- handshake ---------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # b"IHAVEOPT"
CLISERV_MAGIC: Final = 0x00420281861253  # oldstyle second magic
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9

# -- transmission -------------------------------------------------------------
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# Wire layouts (all big-endian).  Named once so parser and builder agree.
GREETING_NEWSTYLE: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
GREETING_OLDSTYLE: Final = struct.Struct(">QQQI124x")  # NBDMAGIC, CLISERV, size, flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
BLOCK_DESCRIPTOR: Final = struct.Struct(">II")  # length, status flags

EXPORT_NAME_PADDING: Final = 124
MAX_OPTION_LENGTH: Final = 64 * 1024  # cap on one option's payload from an untrusted client
# Options one handshake may send (a real client sends a handful): past it the
# connection is broken, so a peer cannot keep one busy with option after option.
MAX_HANDSHAKE_OPTIONS: Final = 64
MAX_STRING_LENGTH: Final = 4096  # NBD strings (names, queries) are at most 4096 bytes

# Limits ferry applies to transmission; the block-size info advertises them.
MAX_REQUEST_SIZE: Final = 32 * 1024 * 1024
MIN_BLOCK_SIZE: Final = 1
PREFERRED_BLOCK_SIZE: Final = 4096


class TLSMode(enum.Enum):
    """How a server treats TLS (``--tls``), the spec's three modes.

    ``OFF`` is NOTLS: NBD_OPT_STARTTLS is refused (ERR_POLICY).  ``ON`` is
    SELECTIVETLS with no TLS-only export: a client may upgrade, or not.
    ``REQUIRE`` is FORCEDTLS: every option but STARTTLS and ABORT is
    ERR_TLS_REQD until TLS is on.
    """

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class BlockState(enum.IntFlag):
    """Flags of a ``base:allocation`` extent."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION: Final = "base:allocation"


class Errno(enum.IntEnum):
    """The error values NBD carries on the wire (fixed by the protocol, not by the host)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# -- ferry's migration extension -------------------------------------------------
#
# Between two ferry nodes the migration stream is ordinary NBD (WRITE,
# WRITE_ZEROES, TRIM, FLUSH) plus two additions that only a ferry listener
# understands; any other NBD server answers the option with ERR_UNSUP, which
# tells the source it is mirroring into a plain NBD target (no handoff).
#
# FERRY_OPT_MIGRATE, sent during option haggling before GO: "I am the
# migration source for this export".  Payload: FERRY_MIGRATE_REQUEST, then
# the name of the lease the source holds on the image (UTF-8, at most
# FERRY_MAX_RESOURCE bytes; empty: it holds none), so a destination not told
# otherwise takes over the same lease.
# A listening ferry answers ACK and then admits this connection (only this
# one) to an export that refuses ordinary clients; ERR_POLICY with a message
# when it is not listening or already has a sender.
#
# FERRY_CMD_COMMIT, a transmission command: "you have it all; take control".
# The offset field carries the lease's fencing token, length is 0.  The
# destination fsyncs, takes control (and the lease), and only then replies;
# the reply is the acknowledgement of the two-phase commit.  An error reply
# means it did not take control; no reply means the outcome is unknown.
FERRY_OPT_MIGRATE: Final = 0x46455201  # b"FER\x01"
FERRY_MIGRATE_VERSION: Final = 1
FERRY_MIGRATE_REQUEST: Final = struct.Struct(">IQ")  # protocol version, image size
FERRY_MAX_RESOURCE: Final = 4096  # bytes of lease name after FERRY_MIGRATE_REQUEST
FERRY_CMD_COMMIT: Final = 0xF001

# Client connections travel with the commit (ferry.migrate.carry).
#
# FERRY_OPT_CONNECTIONS, after FERRY_OPT_MIGRATE's ACK: "can you take my
# clients' live connections?"  No payload.  When the listener can restore
# TCP connections (TCP_REPAIR, CAP_NET_ADMIN) it answers as NBD_OPT_GO
# answers with NBD_REP_INFO: one FERRY_REP_LANDING reply, then a plain ACK.
# The reply's data is FERRY_CONNECTIONS_INFO: who the destination is on the
# network -- its host (the kernel's boot id and its network namespace: on the
# same host and in the same namespace, the source must close a socket before
# the destination can rebuild it) and its service address ("IP/PREFIX@DEV",
# empty: none), each a u16 length then UTF-8.  ERR_UNSUP with the reason
# when it cannot (the source then disconnects its clients at the handoff, as
# a plain listener's would be).
#
# FERRY_CMD_CONNECTION, a transmission command of the sender's, after that
# ACK and before the commit: one client connection's checkpoint (the socket's
# TCP state and its NBD session, ferry.handoff.carried) as the payload; offset
# 0, length at most FERRY_MAX_CONNECTION.  The destination rebuilds the socket
# and replies OK, or an error with the reason (that client is lost, the
# migration goes on).  A rebuilt connection's requests wait until the commit
# lands; a refused commit closes it without a packet.
FERRY_OPT_CONNECTIONS: Final = 0x46455202  # b"FER\x02"
FERRY_REP_LANDING: Final = 0x46455202  # b"FER\x02", a reply type (see FERRY_REP_LOCATION)
FERRY_CMD_CONNECTION: Final = 0xF002
FERRY_MAX_CONNECTION: Final = 128 * 1024 * 1024
FERRY_MAX_CONNECTIONS_FIELD: Final = 512  # bytes of each FERRY_CONNECTIONS_INFO string

# Where an export went (ferry.nbd.locate, for ferry proxy): FERRY_OPT_LOCATE
# asks, FERRY_REP_LOCATION replies (a reply type, not an option: its number
# may repeat an option's).
FERRY_OPT_LOCATE: Final = 0x46455203  # b"FER\x03"
FERRY_REP_LOCATION: Final = 0x46455201  # b"FER\x01"

# flexnbd-compatible mirroring: oldstyle hello, every write carries this
# handle, and NBD_CMD_DISC after the last write means "take control".
FLEXNBD_MIRROR_HANDLE: Final = int.from_bytes(b".MIRROR.", "big")
