"""What travels beside the descriptors at a takeover: the exports, their leases, their clients.

Pure code: bytes in, values out.  The format keeps the rules of the
others that move between processes (``ferry.handoff.carried``,
``ferry.nbd.session``):

* **versioned**: a magic and :data:`TAKEOVER_FORMAT` first, checked before
  anything else; the version is also the descriptor offer's ``format``, so
  a taker that does not read it refuses the offer before anything moves;
* **bounded**: the header by :data:`MAX_HEADER_BYTES`, each client's parts by
  their own readers' limits, the whole by the descriptor exchange's cap;
* **exact**: the parts add up to the blob, with nothing after.

A node hands on all its exports at once (one for ``ferry serve``, every
one of a daemon's), with the listening sockets they share.  The
descriptors come in one SCM_RIGHTS message, in the order
:meth:`TakeoverState.split` reads them: for each export its image and its
lease's lock file (if the grant lives in one), then each listening socket,
then each export's clients.  A blob
that breaks a rule is a :class:`TakeoverStateError`: the taker refuses the
takeover and the giver serves on.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ferry.lease.backend import Grant, Holder, PassedGrant
from ferry.lease.backend import LeaseMode as _LeaseMode
from ferry.nbd.session import SessionSnapshot, SnapshotError

__all__ = [
    "MAX_HEADER_BYTES",
    "PORT_KINDS",
    "TAKEOVER_FORMAT",
    "ClientState",
    "Descriptors",
    "ExportDescriptors",
    "ExportState",
    "ImageState",
    "PortState",
    "TakeoverState",
    "TakeoverStateError",
]

#: The format this ferry writes, and the only one it reads.
TAKEOVER_FORMAT: Final = 1
#: The JSON header (options, exports, leases, ports): a few kilobytes in practice.
MAX_HEADER_BYTES: Final = 1 << 20
#: What a listening socket is for: the NBD port(s), the control socket, /metrics.
PORT_KINDS: Final = frozenset({"nbd", "control", "metrics"})

_MAGIC: Final = b"FTKO"
_PREAMBLE: Final = struct.Struct(">4sHI")  # magic, version, header length
_LENGTH: Final = struct.Struct(">I")
_PORT_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})
_CLIENT_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6})


class TakeoverStateError(ValueError):
    """A blob that is not a takeover state this process reads; the message says why."""


@dataclass(frozen=True, slots=True)
class PortState:
    """One listening socket: what it serves, and its address family."""

    kind: str
    family: int


@dataclass(frozen=True, slots=True)
class ClientState:
    """One client connection: its socket's family, its NBD session, its replies still owed.

    ``replies`` were written by the giver but never reached its kernel: the
    taker writes them first.
    """

    family: int
    session: SessionSnapshot
    replies: bytes = b""


@dataclass(frozen=True, slots=True)
class ImageState:
    """The image as the giver opened it (its descriptor travels)."""

    path: str
    size: int
    read_only: bool


@dataclass(frozen=True, slots=True)
class ExportState:
    """One export: its name, its image, its lease's grant (if it holds one), its clients."""

    name: str
    image: ImageState
    lease: PassedGrant | None
    clients: tuple[ClientState, ...] = field(default=())

    @property
    def has_lock(self) -> bool:
        return self.lease is not None and self.lease.fd is not None

    @property
    def fd_count(self) -> int:
        return 1 + int(self.has_lock) + len(self.clients)


@dataclass(frozen=True, slots=True)
class ExportDescriptors:
    """One export's received descriptors: its image, its lock file's, its clients'."""

    image: int
    lock: int | None
    clients: list[int]

    def all(self) -> list[int]:
        lock = [] if self.lock is None else [self.lock]
        return [self.image, *lock, *self.clients]


@dataclass(frozen=True, slots=True)
class Descriptors:
    """The received descriptors, by what they are (:meth:`TakeoverState.split`)."""

    exports: list[ExportDescriptors]
    ports: list[int]

    def all(self) -> list[int]:
        return [fd for export in self.exports for fd in export.all()] + self.ports


@dataclass(frozen=True)
class TakeoverState:
    """Everything a taker needs beside the descriptors; see the module doc."""

    pid: int
    served: Mapping[str, Any]
    exports: tuple[ExportState, ...]
    ports: tuple[PortState, ...]

    @property
    def fd_count(self) -> int:
        return sum(export.fd_count for export in self.exports) + len(self.ports)

    @property
    def client_count(self) -> int:
        return sum(len(export.clients) for export in self.exports)

    def descriptors(
        self, exports: Sequence[tuple[int, Sequence[int]]], ports: Sequence[int]
    ) -> list[int]:
        """The giver's descriptors in the order of the message: ``exports`` are each
        export's image and clients, in the state's order (the lock's is the lease's)."""
        if len(exports) != len(self.exports) or len(ports) != len(self.ports):
            raise ValueError("one image per export and one descriptor per port")
        heads: list[int] = []
        clients: list[int] = []
        for export, (image, theirs) in zip(self.exports, exports, strict=True):
            if len(theirs) != len(export.clients):
                raise ValueError(f"one descriptor per client of export {export.name!r}")
            lease = export.lease
            lock = [lease.fd] if lease is not None and lease.fd is not None else []
            heads += [image, *lock]
            clients += theirs
        return [*heads, *ports, *clients]

    def split(self, fds: Sequence[int]) -> Descriptors:
        """The received descriptors by what they are; the count must be the state's."""
        if len(fds) != self.fd_count:
            raise TakeoverStateError(
                f"{len(fds)} descriptors came with a state that describes {self.fd_count}"
            )
        rest = list(fds)
        heads = []
        for export in self.exports:
            image = rest.pop(0)
            heads.append((image, rest.pop(0) if export.has_lock else None))
        ports, rest = rest[: len(self.ports)], rest[len(self.ports) :]
        exports = []
        for export, (image, lock) in zip(self.exports, heads, strict=True):
            clients, rest = rest[: len(export.clients)], rest[len(export.clients) :]
            exports.append(ExportDescriptors(image, lock, clients))
        return Descriptors(exports, ports)

    # -- the wire format -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        header = {
            "pid": self.pid,
            "served": dict(self.served),
            "exports": [
                {
                    "name": export.name,
                    "image": {
                        "path": export.image.path,
                        "size": export.image.size,
                        "read_only": export.image.read_only,
                    },
                    "lease": None if export.lease is None else _lease_to_json(export.lease),
                    "clients": [{"family": int(c.family)} for c in export.clients],
                }
                for export in self.exports
            ],
            "ports": [{"kind": p.kind, "family": int(p.family)} for p in self.ports],
        }
        raw = json.dumps(header, sort_keys=True, allow_nan=False).encode()
        if len(raw) > MAX_HEADER_BYTES:
            raise TakeoverStateError(f"a header of {len(raw)} bytes is over {MAX_HEADER_BYTES}")
        parts = [_PREAMBLE.pack(_MAGIC, TAKEOVER_FORMAT, len(raw)), raw]
        for client in (client for export in self.exports for client in export.clients):
            session = client.session.to_bytes()
            parts += [_LENGTH.pack(len(session)), session]
            parts += [_LENGTH.pack(len(client.replies)), client.replies]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> TakeoverState:
        view = memoryview(blob)
        if len(view) < _PREAMBLE.size:
            raise TakeoverStateError(f"{len(view)} bytes is shorter than a takeover state")
        magic, version, header_size = _PREAMBLE.unpack_from(view)
        if magic != _MAGIC:
            raise TakeoverStateError(f"not a takeover state (magic {bytes(magic)!r})")
        if version != TAKEOVER_FORMAT:
            raise TakeoverStateError(
                f"takeover state format {version} is not read here (this ferry reads "
                f"{TAKEOVER_FORMAT})"
            )
        if header_size > MAX_HEADER_BYTES:
            raise TakeoverStateError(f"a header of {header_size} bytes is over the limit")
        at = _PREAMBLE.size
        if at + header_size > len(view):
            raise TakeoverStateError("the takeover state is cut short in its header")
        try:
            header = json.loads(
                bytes(view[at : at + header_size]).decode(), parse_constant=_not_a_number
            )
            state = _from_header(header)
        except (ValueError, KeyError, TypeError) as error:  # JSON, UTF-8 and field errors
            raise TakeoverStateError(f"the takeover state's header: {error}") from None
        at += header_size
        exports = []
        index = 0
        for export in state["exports"]:
            clients = []
            for family in export["client_families"]:
                session, at = _part(view, at, f"client {index}'s session")
                replies, at = _part(view, at, f"client {index}'s replies")
                try:
                    snapshot = SessionSnapshot.from_bytes(session)
                except SnapshotError as error:
                    raise TakeoverStateError(f"client {index}: {error}") from None
                clients.append(ClientState(family, snapshot, bytes(replies)))
                index += 1
            exports.append(
                ExportState(export["name"], export["image"], export["lease"], tuple(clients))
            )
        if at != len(view):
            raise TakeoverStateError(f"{len(view) - at} bytes after the end of the takeover state")
        return cls(
            pid=state["pid"], served=state["served"], exports=tuple(exports), ports=state["ports"]
        )


def _part(view: memoryview, at: int, what: str) -> tuple[memoryview, int]:
    if at + _LENGTH.size > len(view):
        raise TakeoverStateError(f"the takeover state is cut short before {what}")
    (length,) = _LENGTH.unpack_from(view, at)
    at += _LENGTH.size
    if at + length > len(view):
        raise TakeoverStateError(f"the takeover state is cut short in {what}")
    return view[at : at + length], at + length


def _lease_to_json(passed: PassedGrant) -> dict[str, Any]:
    grant = passed.grant
    return {
        "resource": grant.resource,
        "owner": grant.holder.owner,
        "mode": grant.holder.mode.value,
        "token": grant.token,
        "offered": grant.holder.offered,
        "ttl": grant.ttl,
        "handle": grant.handle,
        "detail": dict(passed.detail),
        "valid_for": passed.valid_for,
        "fd": passed.fd is not None,
    }


def _from_header(header: Any) -> dict[str, Any]:
    """The header's fields, type-checked; KeyError, TypeError or ValueError if wrong."""
    top = _object(header, "the header")
    # What the giver serves with: read (and checked) by ferry.takeover.options.
    served = _object(top["served"], "served")
    _object(served["node"], "served node options")
    _list(served["exports"], "served exports")
    exports = [_export_from_json(entry) for entry in _list(top["exports"], "exports")]
    names = [export["name"] for export in exports]
    if len(set(names)) != len(names):
        raise ValueError("two exports of one name")
    ports = []
    for entry in _list(top["ports"], "ports"):
        port = _object(entry, "a port")
        kind, family = _text(port["kind"], "a port's kind"), _whole(port["family"], "a family")
        if kind not in PORT_KINDS or family not in _PORT_FAMILIES:
            raise ValueError(f"a {kind!r} port of family {family}")
        ports.append(PortState(kind, family))
    return {
        "pid": _whole(top["pid"], "pid"),
        "served": served,
        "exports": exports,
        "ports": tuple(ports),
    }


def _export_from_json(raw: Any) -> dict[str, Any]:
    export = _object(raw, "an export")
    image = _object(export["image"], "an export's image")
    size = _whole(image["size"], "the image's size")
    if size <= 0:
        raise ValueError(f"an image of {size} bytes")
    families = []
    for entry in _list(export["clients"], "clients"):
        family = _whole(_object(entry, "a client")["family"], "a client's family")
        if family not in _CLIENT_FAMILIES:
            raise ValueError(f"a client of address family {family}")
        families.append(family)
    return {
        "name": _text(export["name"], "an export's name"),
        "image": ImageState(
            _text(image["path"], "the image's path"), size, _flag(image["read_only"], "read_only")
        ),
        "lease": None if export["lease"] is None else _lease_from_json(export["lease"]),
        "client_families": families,
    }


def _lease_from_json(raw: Any) -> PassedGrant:
    lease = _object(raw, "the lease")
    ttl = lease["ttl"]
    if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0):
        raise ValueError(f"a lease TTL of {ttl!r}")
    valid_for = lease["valid_for"]
    if valid_for is not None and (
        not isinstance(valid_for, int | float) or isinstance(valid_for, bool) or valid_for < 0
    ):
        raise ValueError(f"a lease good for {valid_for!r} seconds")
    holder = Holder(
        _text(lease["owner"], "the lease's owner"),
        _LeaseMode(lease["mode"]),
        _whole(lease["token"], "the lease's token"),
        _flag(lease["offered"], "offered"),
    )
    grant = Grant(
        _text(lease["resource"], "the lease's resource"),
        holder,
        None if ttl is None else float(ttl),
        _whole(lease["handle"], "the lease's handle"),
    )
    detail = _object(lease["detail"], "the lease's detail")
    fd = -1 if _flag(lease["fd"], "fd") else None  # the descriptor itself comes apart
    return PassedGrant(grant, detail, fd, None if valid_for is None else float(valid_for))


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} is not a list")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} is not a string")
    return value


def _whole(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{what} is not a whole number")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} is not true or false")
    return value
