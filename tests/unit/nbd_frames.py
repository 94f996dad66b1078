"""Build what an NBD client sends and take apart what a server answers.

Written from the protocol document (doc/proto.md of NetworkBlockDevice/nbd),
with every number spelled out here rather than imported from ``ferry.nbd``:
a test that builds its frames with the code under test cannot catch that
code getting a layout or a number wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- numbers, as the spec writes them ---------------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

# transmission flags
HAS_FLAGS = 1 << 0
READ_ONLY = 1 << 1
SEND_FLUSH = 1 << 2
SEND_FUA = 1 << 3
SEND_TRIM = 1 << 5
SEND_WRITE_ZEROES = 1 << 6
SEND_DF = 1 << 7
CAN_MULTI_CONN = 1 << 8
SEND_CACHE = 1 << 10
SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured replies
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1

# errors
EPERM = 1
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75

# -- what the client sends ---------------------------------------------------------


def client_flags(flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def string(text: str) -> bytes:
    """An NBD string with its 32-bit length in front (the form options use inside data)."""
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str, *infos: int) -> bytes:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""
    return (
        string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request(
    cmd: int,
    handle: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    data: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + data


def write(handle: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return request(CMD_WRITE, handle, offset, len(data), flags, data)


def read(handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return request(CMD_READ, handle, offset, length, flags)


# -- what the server answers -------------------------------------------------------


def newstyle_greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return NBDMAGIC + IHAVEOPT + struct.pack(">H", flags)


def oldstyle_greeting(size: int, flags: int) -> bytes:
    return NBDMAGIC + struct.pack(">QQI", CLISERV_MAGIC, size, flags) + bytes(124)


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    data: bytes


def option_replies(stream: bytes) -> list[OptionReply]:
    """Every option reply in ``stream``, which must hold nothing else."""
    replies = []
    pos = 0
    while pos < len(stream):
        assert len(stream) - pos >= 20, f"truncated option reply header at {pos}"
        magic, opt, kind, length = struct.unpack_from(">QIII", stream, pos)
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x} at {pos}"
        pos += 20
        assert len(stream) - pos >= length, "truncated option reply data"
        replies.append(OptionReply(opt, kind, stream[pos : pos + length]))
        pos += length
    return replies


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def simple_reply(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)


def structured_chunk(
    handle: int, kind: int, data: bytes = b"", flags: int = REPLY_FLAG_DONE
) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(data)) + data
