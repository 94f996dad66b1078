"""A node's exports, by name: each image with its role, its migrations and its lease.

``ferry serve`` has one export; a daemon has many, added and removed while it
runs.  Whatever serves, controls, observes or moves an export finds it here
by name, never through a field of the node that assumes there is only one:
the NBD catalog (the handshake), the control commands, the metrics, the
migration manager, the shutdown.

An :class:`ExportUnit` is everything that belongs to one export: the image
and its role (:class:`~ferry.serve.export.Export`), its migrations
(:class:`~ferry.migrate.manager.MirrorManager`, at most one at a time), and
its lease once it holds one (or, listening, its lease-to-be).  A lease that
is lost fences the unit: the role goes ``fenced`` and a running migration
ends.  The :class:`ExportRegistry` holds the units by name; the empty name
is the first export added (NBD's default export).

A daemon describes its exports in a file: an :class:`ExportConfig` is one
``[[export]]`` table of it (or ``ferry serve``'s one export, or one
``export.add``), everything about the export that its operator chooses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ferry.chartnames import RoleState, RoleTrigger
from ferry.hooks import NO_HOOKS, HookConfig, HookStats, Stage, parse_hooks
from ferry.lease.incoming import IncomingLease
from ferry.lease.manager import LeaseManager
from ferry.migrate.core.stats import MigrationStats
from ferry.migrate.manager import MirrorManager
from ferry.serve.acl import Acl, AclError
from ferry.serve.export import RECEIVING_STATES, Export
from ferry.serve.stats import RequestStats
from ferry.status import StatusSnapshot
from ferry.storage import Image
from ferry.trace import TraceRecord

__all__ = [
    "EXPORT_KEYS",
    "BadExportConfig",
    "ExportBusy",
    "ExportConfig",
    "ExportError",
    "ExportRegistry",
    "ExportUnit",
    "UnknownExport",
    "export_of",
    "name_problem",
    "parse_export",
]

log = Logger()


@dataclass(frozen=True)
class ExportConfig:
    """One export: which file, under which name, serving or waiting for a migration."""

    file: str
    name: str = ""
    read_only: bool = False
    listen: bool = False  # wait for a migration instead of serving at once
    resource: str | None = None  # the lease's name (default: the image's real path)
    description: str = ""
    # Who may use the export by name (flexnbd's rule: empty admits everyone
    # unless default_deny); the listener's own ACL is checked first.
    acl: tuple[str, ...] = ()
    default_deny: bool = False
    # A migration's max_downtime when its ``mirror`` names none (seconds).
    max_downtime: float | None = None
    # Executables run at a migration's stages (ferry.hooks); a daemon's own come under them.
    hooks: HookConfig = NO_HOOKS

    @property
    def export_name(self) -> str:
        """``--name``, or the file's name (also what logs and traces call it)."""
        return self.name or os.path.basename(self.file)

    @property
    def mode(self) -> str:
        """``serve`` or ``listen``, as a daemon's file and ``export.add`` spell it."""
        return "listen" if self.listen else "serve"

    def settings(self) -> dict[str, Any]:
        """The export's settings under :data:`EXPORT_KEYS` (what :func:`parse_export` reads)."""
        return {
            "name": self.export_name,
            "file": self.file,
            "mode": self.mode,
            "read_only": self.read_only,
            "acl": list(self.acl),
            "default_deny": self.default_deny,
            "resource": self.resource,
            "max_downtime": self.max_downtime,
            "hooks": self.hooks.settings(),
            "hook_timeout": self.hooks.timeout,
        }


#: The settings of one export, as a daemon's ``[[export]]`` table and
#: ``export.add`` name them.
EXPORT_KEYS: Final = (
    "name",
    "file",
    "mode",
    "read_only",
    "acl",
    "default_deny",
    "resource",
    "max_downtime",
    "hooks",
    "hook_timeout",
)

#: NBD's limit on an export name, in bytes of UTF-8.
MAX_NAME_BYTES: Final = 4096


class BadExportConfig(ValueError):
    """One setting of an export is wrong: ``key`` names it, ``str`` says why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def parse_export(table: Mapping[str, Any]) -> ExportConfig:
    """An :class:`ExportConfig` from its settings (see :data:`EXPORT_KEYS`), checked.

    Raises :class:`BadExportConfig` naming the first wrong key; the values
    come from TOML or JSON, so a type is checked as strictly as it is written
    (``read_only = "yes"`` is an error, not true).
    """
    for key in table:
        if key not in EXPORT_KEYS:
            raise BadExportConfig(
                key, f"unknown setting (an export takes {', '.join(EXPORT_KEYS)})"
            )
    name = _text(table, "name")
    if name is None:
        raise BadExportConfig("name", "missing: every export needs a name")
    problem = name_problem(name)
    if problem is not None:
        raise BadExportConfig("name", problem)
    file = _text(table, "file")
    if file is None:
        raise BadExportConfig("file", "missing: which image does the export serve?")
    mode = _text(table, "mode") or "serve"
    if mode not in ("serve", "listen"):
        raise BadExportConfig("mode", f'must be "serve" or "listen", not {mode!r}')
    acl = table.get("acl", [])
    if not isinstance(acl, list) or not all(isinstance(entry, str) for entry in acl):
        raise BadExportConfig("acl", "must be a list of addresses or CIDR networks (strings)")
    try:
        Acl.parse(acl)
    except AclError as error:
        raise BadExportConfig("acl", str(error)) from None
    max_downtime = _seconds(table, "max_downtime")
    try:
        hooks = parse_hooks(table.get("hooks"), table.get("hook_timeout"))
    except ValueError as error:
        key = "hook_timeout" if str(error).startswith("hook_timeout") else "hooks"
        raise BadExportConfig(key, str(error)) from None
    return ExportConfig(
        file=file,
        name=name,
        read_only=_flag(table, "read_only"),
        listen=mode == "listen",
        resource=_text(table, "resource"),
        acl=tuple(acl),
        default_deny=_flag(table, "default_deny"),
        max_downtime=max_downtime,
        hooks=hooks,
    )


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an export's name (None: it can): NBD carries it as at most
    4096 bytes of UTF-8, and logs, traces and lease names carry it too."""
    problem = _text_problem(name)
    if problem is None and len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"longer than NBD's {MAX_NAME_BYTES} bytes"
    return problem


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be a name or a path (None: it can): JSON's ``\\ud800`` spells a
    lone surrogate, which no UTF-8 can carry, and ``\\u0000`` a NUL, which no path can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 text (a lone surrogate)"
    if "\x00" in text:
        return "contains a NUL character"
    return None


def _text(table: Mapping[str, Any], key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadExportConfig(key, f"must be a non-empty string, not {value!r}")
    problem = _text_problem(value)
    if problem is not None:
        raise BadExportConfig(key, problem)
    return value


def _seconds(table: Mapping[str, Any], key: str) -> float | None:
    """A positive, finite number of seconds, from TOML or JSON."""
    value = table.get(key)
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer past a float's range
            seconds = float(value)
    if seconds is None or not 0 < seconds < float("inf"):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise BadExportConfig(key, f"must be a positive number of seconds, not {shown}")
    return seconds


def _flag(table: Mapping[str, Any], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise BadExportConfig(key, f"must be true or false, not {value!r}")
    return value


def export_of(record: TraceRecord) -> str | None:
    """The name of the export a role's, a migration's or a moving connection's record is
    about; None for a lease's, which names its resource (:meth:`ExportUnit.owns` knows);
    "" for a takeover's, which is about the whole node.

    A connection machine's instance is ``EXPORT/HOST:PORT`` (``ferry.migrate.carry``),
    and an export's name may hold a ``/`` itself.
    """
    if record.machine == "lease":
        return None
    if record.machine == "takeover":  # the whole node's (ferry.takeover.give)
        return ""
    if record.machine == "connection":
        return record.instance.rpartition("/")[0]
    return record.instance


class UnknownExport(LookupError):
    """No export of that name; ``str`` says so, in one line."""


class ExportError(Exception):
    """An export cannot be added (its file, its name, its lease); ``str`` says why, in one line."""


class ExportBusy(Exception):
    """The export is migrating (out or in) and may not go now; ``str`` says so, in one line."""


class ExportUnit:
    """One export and what belongs to it; see the module doc."""

    def __init__(self, config: ExportConfig, export: Export, mirrors: MirrorManager) -> None:
        self.config = config
        self.export = export
        self.mirrors = mirrors
        self.lease: LeaseManager | None = None
        self.incoming: IncomingLease | None = None
        # The name of the lease it takes (or listens for), once the node knows it.
        self.resource: str | None = None
        #: Where clients reach it, ``HOST:PORT`` (None until the node's port is open).
        self.address: str | None = None
        #: Whether its clients can move with it at a handoff (this host's capability).
        self.can_move_connections: bool | None = None
        if mirrors.hooks is not None:
            export.observe_role(self._tell_hooks)

    def _tell_hooks(self, trigger: str, source: str, dest: str) -> None:
        """The hooks that only tell: the image handed off, taken over, or fenced."""
        hooks = self.mirrors.hooks
        if hooks is None or source == dest:
            return
        if dest == RoleState.HANDED_OFF:
            current = self.mirrors.current
            hooks.notify(Stage.POST_HANDOFF, "" if current is None else str(current.destination))
        elif dest == RoleState.SERVING and trigger == RoleTrigger.COMMITTED:
            hooks.notify(Stage.POST_TAKEOVER)
        elif dest == RoleState.FENCED:
            hooks.notify(Stage.FENCED)

    @property
    def hook_stats(self) -> HookStats | None:
        hooks = self.mirrors.hooks
        return None if hooks is None else hooks.stats

    @property
    def name(self) -> str:
        return self.export.name

    @property
    def image(self) -> Image:
        return self.export.image

    # -- what the metrics see (ferry.metrics.Observable) ------------------------------

    @property
    def stats(self) -> RequestStats:
        return self.export.stats

    @property
    def migration_stats(self) -> MigrationStats:
        return self.mirrors.stats

    def snapshot(self) -> StatusSnapshot:
        """The export's status, with the migration's fields while one runs or after it."""
        return dataclasses.replace(
            self.mirrors.snapshot(),
            address=self.address,
            can_move_connections=self.can_move_connections,
        )

    @property
    def migrating(self) -> str | None:
        """How the export is moving now: ``"out"``, ``"in"``, or None when it is not."""
        if self.mirrors.running:
            return "out"
        if self.export.state in RECEIVING_STATES:
            return "in"
        return None

    def owns(self, record: TraceRecord) -> bool:
        """Whether ``record`` is a transition of this export's role, migration, lease, or of
        one of its client connections moving."""
        if record.machine == "lease":
            return record.instance in self._lease_resources()
        return export_of(record) == self.name

    def _lease_resources(self) -> set[str]:
        names = {self.resource} if self.resource is not None else set()
        if self.lease is not None:
            names.add(self.lease.resource)
        if self.incoming is not None and self.incoming.manager is not None:
            names.add(self.incoming.manager.resource)
        return names

    def describe(self) -> dict[str, Any]:
        """One row of ``export.list``: what it is, where it stands, who uses it."""
        lease = self.lease or (self.incoming.manager if self.incoming is not None else None)
        return {
            "name": self.name,
            "file": self.config.file,
            "mode": self.config.mode,
            "read_only": self.image.read_only,
            "state": self.export.state,
            "clients": self.export.num_clients,
            "migrating": self.migrating,
            "lease": None
            if lease is None
            else {"resource": lease.resource, "state": lease.state, "token": lease.token},
        }

    # -- the lease ---------------------------------------------------------------------

    def holds(self, lease: LeaseManager) -> None:
        """This export's I/O runs under ``lease`` from now on, and a migration hands it on."""
        self.lease = lease
        self.export.lease = lease
        self.mirrors.lease = lease

    def fenced(self, reason: str) -> None:
        """The lease is gone: this export must not touch its image again.

        The data plane already refuses every request (``Export.lease``); the
        role goes ``fenced`` so status, metrics and the handshake say so,
        and a running migration ends.
        """
        log.error(
            "{name}: lease lost: {reason}; fenced, no further I/O", name=self.name, reason=reason
        )
        if self.mirrors.hooks is not None:
            self.mirrors.hooks.notify(Stage.LEASE_LOST)
        # lease_lost leaves exactly the states with control (role.yaml).
        if self.export.has_control:
            self.export.trigger(RoleTrigger.LEASE_LOST)
        self.mirrors.lease_lost(reason)

    # -- the end -------------------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """The role stopped, the lease given back: after its clients have been drained."""
        self.export.trigger(RoleTrigger.SHUTDOWN)
        lease = self.lease
        incoming = self.incoming
        if lease is None and incoming is not None and incoming.manager is not None:
            lease = incoming.manager
        if lease is None:
            return defer.succeed(None)
        return lease.shutdown()


class ExportRegistry:
    """The node's exports by name, in the order they were added."""

    def __init__(self) -> None:
        self._units: dict[str, ExportUnit] = {}

    def add(self, unit: ExportUnit) -> None:
        if unit.name in self._units:
            raise ValueError(f"an export named {unit.name!r} exists already")
        self._units[unit.name] = unit

    def remove(self, name: str) -> ExportUnit:
        unit = self.get(name)
        del self._units[unit.name]
        return unit

    def get(self, name: str | None = None) -> ExportUnit:
        """The export called ``name``; None or "" is the default (the first) export."""
        if not name:
            for unit in self._units.values():
                return unit
            raise UnknownExport("this node has no export")
        try:
            return self._units[name]
        except KeyError:
            raise UnknownExport(f"no export named {name!r}") from None

    def __iter__(self) -> Iterator[ExportUnit]:
        return iter(list(self._units.values()))

    def __len__(self) -> int:
        return len(self._units)

    def names(self) -> list[str]:
        return list(self._units)
