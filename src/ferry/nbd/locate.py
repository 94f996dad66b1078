"""ferry's ``FERRY_OPT_LOCATE``: "is this export still here, and if not, where did it go?"

A client that follows an image across migrations (``ferry proxy``) asks
this before GO, every time it connects.  The server that handed the image
off knows where it went; without being asked it can only refuse GO, and
the client would be left retrying an address that will never serve again.

The exchange, during option haggling (fixed newstyle)::

    client:  FERRY_OPT_LOCATE   u32 name length, export name (UTF-8; "" = the default)
    server:  FERRY_REP_LOCATION zero or more, best first: where the image is now
    server:  ACK                the end of the answer

* ACK with no LOCATION before it: nothing better is known than here; go on
  and ask GO (the export may be served here, or refused with its own reason).
* LOCATION(s), then ACK: this server no longer has the image; it is served
  at the location(s), under the export name each carries ("" means the
  name asked for).
* ERR_UNSUP: a server without the extension (any NBD server but ferry);
  ERR_UNKNOWN: no export of that name; ERR_INVALID: the request does not
  parse.  The handshake goes on after any of them.

A LOCATION's payload is ``LOCATION``: port (u16), host length (u16), then
the host (an address or a name, UTF-8, IPv6 without brackets) and the rest
of the payload is the export name there.  The reply type is below 2**31
(it is not an error) and spells ``FER\\x01``, as the option's number
spells ``FER\\x03``: no NBD reply type comes near either.  Both numbers
live in :mod:`ferry.nbd.constants`, with ferry's other extensions'.

Sans-IO like the rest of ``ferry.nbd``: this module builds and parses the
payloads; the connections carry them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ferry.nbd.constants import FERRY_OPT_LOCATE, FERRY_REP_LOCATION, MAX_STRING_LENGTH

__all__ = [
    "FERRY_OPT_LOCATE",
    "FERRY_REP_LOCATION",
    "Location",
    "decode_locate_request",
    "decode_location",
    "encode_location",
    "locate_option",
]

_NAME_LENGTH: Final = struct.Struct(">I")
_LOCATION: Final = struct.Struct(">HH")  # port, host length


@dataclass(frozen=True, slots=True)
class Location:
    """Where an export is served: ``host`` (address or name), ``port``, and its name there."""

    host: str
    port: int
    export_name: str = ""

    def __post_init__(self) -> None:
        if not self.host or len(self.host.encode()) > MAX_STRING_LENGTH:
            raise ValueError(f"host {self.host!r} is empty or too long")
        if self.host.startswith("["):
            raise ValueError(f"host {self.host!r}: an IPv6 address goes without brackets")
        if not 0 < self.port < 1 << 16:
            raise ValueError(f"port {self.port} is not in 1..65535")
        if len(self.export_name.encode()) > MAX_STRING_LENGTH:
            raise ValueError("export name too long")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def locate_option(export_name: str) -> tuple[int, bytes]:
    """The ``FERRY_OPT_LOCATE`` option asking for ``export_name``, for ``extra_options``."""
    name = export_name.encode()
    if len(name) > MAX_STRING_LENGTH:
        raise ValueError(f"export name of {len(name)} bytes; at most {MAX_STRING_LENGTH}")
    return FERRY_OPT_LOCATE, _NAME_LENGTH.pack(len(name)) + name


def decode_locate_request(payload: bytes) -> str:
    """The export name a ``FERRY_OPT_LOCATE`` asks for; ValueError if it does not parse."""
    if len(payload) < _NAME_LENGTH.size:
        raise ValueError("shorter than its name length")
    (length,) = _NAME_LENGTH.unpack_from(payload)
    if length > MAX_STRING_LENGTH or len(payload) != _NAME_LENGTH.size + length:
        raise ValueError(f"a name of {length} bytes in {len(payload)} bytes of data")
    return _text(payload[_NAME_LENGTH.size :], "export name")


def encode_location(location: Location) -> bytes:
    """The payload of one ``FERRY_REP_LOCATION`` reply."""
    host = location.host.encode()
    return _LOCATION.pack(location.port, len(host)) + host + location.export_name.encode()


def decode_location(payload: bytes) -> Location:
    """A ``FERRY_REP_LOCATION`` payload; ValueError if it does not parse."""
    if len(payload) < _LOCATION.size:
        raise ValueError(f"location of {len(payload)} bytes")
    port, length = _LOCATION.unpack_from(payload)
    end = _LOCATION.size + length
    if end > len(payload):
        raise ValueError("host runs past the end of the location")
    host = _text(payload[_LOCATION.size : end], "host")
    return Location(host, port, _text(payload[end:], "export name"))


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
