"""``--lockspace`` text, the lockspace it names, and the defaults.

Two kinds of lockspace exist:

* ``local:DIR`` -- :class:`~ferry.lease.local.LocalLockspace`, lock files
  in a directory; the embedded default (:func:`default_lockspace`).
* ``etcd:http://HOST:PORT[,HOST:PORT...]`` -- an etcd v3 cluster through
  its HTTP/JSON gateway.  Later endpoints may leave out the scheme, and
  take the first one's.  ``https://`` endpoints speak TLS, and options
  after a ``?`` say how ferry gets in (``&`` between them; every file's path
  is made absolute)::

      cacert=FILE         the CA that issued etcd's certificates (default: the system's)
      cert=FILE, key=FILE ferry's client certificate and key (etcd --client-cert-auth)
      user=NAME           an etcd user (etcd auth enable) ...
      password-file=FILE  ... and the file holding its password (never the command line)

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
from urllib.parse import parse_qsl, urlsplit

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

_USAGE: Final = "expected local:DIR or etcd:http[s]://HOST:PORT[,HOST:PORT...][?OPTION=VALUE&...]"
#: The options of an etcd lockspace (after ``?``): what each names.
ETCD_OPTIONS: Final = ("cacert", "cert", "key", "user", "password-file")
_MAX_PASSWORD: Final = 4096


@dataclass(frozen=True)
class LocalSpec:
    """``local:DIR``; ``directory`` is absolute, so every process means the same one."""

    directory: Path

    def __str__(self) -> str:
        return f"local:{self.directory}"


@dataclass(frozen=True)
class EtcdSpec:
    """``etcd:...``; ``endpoints`` are normalised to ``http[s]://host:port``.

    ``cacert``, ``cert``, ``key`` (absolute paths; https only), ``user`` and
    ``password_file`` say how ferry gets in; the password itself is read by
    :func:`open_lockspace`, never kept here.
    """

    endpoints: tuple[str, ...]
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.endpoints[0].startswith("https://")

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
        return _parse_etcd(text, rest)
    raise ValueError(f"lockspace {text!r} has unknown scheme {scheme!r}: {_USAGE}")


def _parse_etcd(text: str, rest: str) -> EtcdSpec:
    where, _, query = rest.partition("?")
    endpoints = _parse_endpoints(text, where)
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"lockspace {text!r}: options are NAME=VALUE joined by &") from None
    for name, value in pairs:
        if name not in ETCD_OPTIONS:
            known = ", ".join(ETCD_OPTIONS)
            raise ValueError(f"lockspace {text!r}: unknown option {name!r} (known: {known})")
        if name in options:
            raise ValueError(f"lockspace {text!r}: option {name!r} is given twice")
        if not value:
            raise ValueError(f"lockspace {text!r}: option {name!r} is empty")
        options[name] = value
    tls = endpoints[0].startswith("https://")
    files = {name: Path(value).absolute() for name, value in options.items() if name != "user"}
    if not tls and {"cacert", "cert", "key"} & options.keys():
        raise ValueError(f"lockspace {text!r}: cacert, cert and key are for https:// endpoints")
    if ("cert" in options) != ("key" in options):
        raise ValueError(f"lockspace {text!r}: cert and key come together")
    if ("user" in options) != ("password-file" in options):
        raise ValueError(f"lockspace {text!r}: user and password-file come together")
    return EtcdSpec(
        endpoints,
        cacert=files.get("cacert"),
        cert=files.get("cert"),
        key=files.get("key"),
        user=options.get("user"),
        password_file=files.get("password-file"),
    )


def _parse_endpoints(text: str, rest: str) -> tuple[str, ...]:
    items = [item.strip() for item in rest.split(",")]
    if not rest.strip() or not all(items):
        raise ValueError(f"lockspace {text!r}: an etcd endpoint is empty: {_USAGE}")
    first = items[0].split("://", 1)[0] if "://" in items[0] else "http"
    endpoints = tuple(_parse_endpoint(text, item, first) for item in items)
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"lockspace {text!r} lists an endpoint twice")
    return endpoints


def _parse_endpoint(text: str, item: str, scheme: str) -> str:
    url = item if "://" in item else f"{scheme}://{item}"
    where = f"lockspace {text!r}: endpoint {item!r}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"{where}: only http:// and https:// are supported (the etcd gateway), "
            f"not {parts.scheme}"
        )
    if parts.scheme != scheme:
        raise ValueError(f"{where}: every endpoint must use {scheme}://, as the first does")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{where}: expected {scheme}://HOST:PORT and nothing more")
    if not parts.hostname:
        raise ValueError(f"{where} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{where} has a bad port (1-65535)") from None
    if port is None or port == 0:
        raise ValueError(f"{where} names no port (etcd's is usually 2379)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port}"


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
    options.update(_etcd_access(spec))
    backend: LeaseBackend = etcd.EtcdLockspace(list(spec.endpoints), reactor=reactor, **options)
    return backend


def _etcd_access(spec: EtcdSpec) -> dict[str, Any]:
    """The TLS settings and the user an etcd lockspace logs in with, read from their files.

    Raises :class:`LockspaceUnavailable` with one line per problem.
    """
    from ferry.tls import TLSError, load_client_tls

    access: dict[str, Any] = {}
    if spec.tls:

        def path(name: Path | None) -> str | None:
            return None if name is None else str(name)

        try:
            access["tls"] = load_client_tls(path(spec.cacert), path(spec.cert), path(spec.key))
        except TLSError as error:
            raise LockspaceUnavailable(str(error)) from None
    if spec.user is not None and spec.password_file is not None:
        access["user"] = spec.user
        access["password"] = _read_password(spec.password_file)
    return access


def _read_password(path: Path) -> str:
    """The first line of ``path``: an etcd password, kept out of argv and the environment."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_PASSWORD + 1)
    except OSError as error:
        raise LockspaceUnavailable(f"password-file {path}: {error.strerror}") from None
    if len(raw) > _MAX_PASSWORD:
        raise LockspaceUnavailable(f"password-file {path}: over {_MAX_PASSWORD} bytes")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise LockspaceUnavailable(f"password-file {path}: not UTF-8 text") from None
    if not lines or not lines[0]:
        raise LockspaceUnavailable(f"password-file {path}: the first line is empty")
    return lines[0]


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
