"""``--lockspace`` text, the lockspace it names, and the defaults.

Two kinds of lockspace exist:

* ``local:DIR`` -- :class:`~ferry.lease.local.LocalLockspace`, lock files
  in a directory; the embedded default (:func:`default_lockspace`).
* ``etcd:http://HOST:PORT[,HOST:PORT...]`` -- an etcd v3 cluster through
  its HTTP/JSON gateway.  Later endpoints may leave out ``http://``.

:func:`parse_lockspace` only reads text (so a typo is reported before
anything starts); :func:`open_lockspace` makes the backend.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from ferry.lease.backend import LeaseBackend, LockspaceUnavailable

__all__ = [
    "ROOT_LOCK_DIR",
    "EtcdSpec",
    "LocalSpec",
    "LockspaceSpec",
    "default_lockspace",
    "default_lockspace_dir",
    "default_resource",
    "open_lockspace",
    "parse_lockspace",
]

ROOT_LOCK_DIR: Final = Path("/var/lib/ferry/locks")
"""The default lockspace of a ferry run as root (where virtlockd keeps its own)."""

_USAGE: Final = "expected local:DIR or etcd:http://HOST:PORT[,HOST:PORT...]"


@dataclass(frozen=True)
class LocalSpec:
    """``local:DIR``; ``directory`` is absolute, so every process means the same one."""

    directory: Path

    def __str__(self) -> str:
        return f"local:{self.directory}"


@dataclass(frozen=True)
class EtcdSpec:
    """``etcd:...``; ``endpoints`` are normalised to ``http://host:port``."""

    endpoints: tuple[str, ...]

    def __str__(self) -> str:
        return "etcd:" + ",".join(self.endpoints)


LockspaceSpec = LocalSpec | EtcdSpec


def parse_lockspace(text: str) -> LockspaceSpec:
    """Read a ``--lockspace`` value; :class:`ValueError` says what is wrong with it.

    A relative ``local:`` directory is made absolute against the current
    directory now: a lockspace is shared between processes, and two
    processes started in different directories must not silently use two.
    """
    scheme, colon, rest = text.strip().partition(":")
    if not colon:
        raise ValueError(f"lockspace {text!r} has no scheme: {_USAGE}")
    if scheme == "local":
        if not rest.strip():
            raise ValueError(f"lockspace {text!r} names no directory: {_USAGE}")
        return LocalSpec(Path(rest).absolute())
    if scheme == "etcd":
        return EtcdSpec(_parse_endpoints(text, rest))
    raise ValueError(f"lockspace {text!r} has unknown scheme {scheme!r}: {_USAGE}")


def _parse_endpoints(text: str, rest: str) -> tuple[str, ...]:
    items = [item.strip() for item in rest.split(",")]
    if not rest.strip() or not all(items):
        raise ValueError(f"lockspace {text!r}: an etcd endpoint is empty: {_USAGE}")
    endpoints = tuple(_parse_endpoint(text, item) for item in items)
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"lockspace {text!r} lists an endpoint twice")
    return endpoints


def _parse_endpoint(text: str, item: str) -> str:
    url = item if "://" in item else f"http://{item}"
    where = f"lockspace {text!r}: endpoint {item!r}"
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(
            f"{where}: only http:// is supported (the etcd gateway), not {parts.scheme}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{where}: expected http://HOST:PORT and nothing more")
    if not parts.hostname:
        raise ValueError(f"{where} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{where} has a bad port (1-65535)") from None
    if port is None or port == 0:
        raise ValueError(f"{where} names no port (etcd's is usually 2379)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{port}"


def open_lockspace(
    spec: LockspaceSpec | str, *, reactor: Any, ttl: float | None = None, clock: Any = None
) -> LeaseBackend:
    """The backend ``spec`` names.  ``reactor`` runs etcd's requests and a local
    lockspace's watch on its directory (None: no watch).

    ``clock`` (a :class:`~ferry.clock.ReactorClock`) is the one whose
    ``cancel_all`` a shutdown calls; the etcd backend's timers go through it.
    ``ttl`` is how long an etcd grant outlives its last renewal (None: the
    backend's default).  A local lock has no TTL -- the kernel drops it when
    its holder dies -- so a local lockspace ignores it.

    The etcd backend is imported only when asked for, so a node that uses a
    local lockspace never loads its HTTP client.
    """
    if isinstance(spec, str):
        spec = parse_lockspace(spec)
    if isinstance(spec, LocalSpec):
        from ferry.lease.local import LocalLockspace

        return LocalLockspace(spec.directory, reactor=reactor)
    # By name: the module is optional at type-check time as well as at run time.
    etcd = importlib.import_module("ferry.lease.etcd")
    options: dict[str, Any] = {} if ttl is None else {"ttl": ttl}
    if clock is not None:
        options["clock"] = clock
    backend: LeaseBackend = etcd.EtcdLockspace(list(spec.endpoints), reactor=reactor, **options)
    return backend


def default_resource(image_path: str | os.PathLike[str]) -> str:
    """The lease resource of an image: its absolute path with symlinks resolved.

    A lock protects a file, not a name: two exports reaching one image
    through a symlink and its target must compete for one lease, so the
    name is canonical (``realpath``, as libvirt's lockd canonicalises disk
    paths).  The consequence to know: a migration's source and destination
    must reach the image under the same canonical path (one shared mount
    point on every host) or be given the same resource name explicitly, or
    the destination's take-over asks about a different resource.
    """
    return os.path.realpath(os.fspath(image_path))


def default_lockspace_dir(
    *,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
    home: Path | None = None,
) -> Path:
    """Where the embedded lockspace lives by default (not created here).

    Root: :data:`ROOT_LOCK_DIR`.  Anyone else: ``$XDG_STATE_HOME/ferry/locks``
    when that is set to an absolute path (the XDG rule), else
    ``~/.local/state/ferry/locks``.  Locks are state, not cache: losing them
    while a holder runs would let a second holder in.
    """
    environ = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return ROOT_LOCK_DIR
    state = environ.get("XDG_STATE_HOME", "")
    if state and os.path.isabs(state):
        return Path(state) / "ferry" / "locks"
    home = Path.home() if home is None else home
    return home / ".local" / "state" / "ferry" / "locks"


def default_lockspace(directory: Path | None = None) -> LocalSpec:
    """The embedded default ``local:`` lockspace, its directory created (mode 0700) if missing.

    Raises :class:`LockspaceUnavailable` naming the directory if it cannot
    be created.
    """
    directory = default_lockspace_dir() if directory is None else directory
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise LockspaceUnavailable(
            f"cannot create lockspace directory {directory}: {err.strerror or err}"
        ) from None
    return LocalSpec(directory)
