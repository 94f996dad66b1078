"""The control commands, independent of how they arrive.

Both wire forms of the control socket (flexnbd's lines and JSON-RPC) call
these.  A command answers a :class:`Reply` (or a Deferred of one, for
``mirror``, which answers after the destination's hello): an exit status
and a text, as flexnbd's ``N: text`` line, plus a JSON value for the RPC.
The argument checks and their words are flexnbd's, so its tooling can tell
the failures apart.

A command about one export finds it in the node's
:class:`~ferry.exports.ExportRegistry` by the JSON parameter ``export``;
without one (and always in flexnbd's line form, which has no place for it)
it is the node's default export.

The exports themselves are commands too, named after QMP's
``block-export-add``, ``block-export-del`` and ``query-block-exports``:
``export.add`` (the settings of a daemon's ``[[export]]`` table as params),
``export.remove`` (``name``, and ``force`` to break a migration of it), and
``export.list``.  The node adds and removes them (:class:`ExportHost`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ferry.exports import (
    BadExportConfig,
    ExportBusy,
    ExportConfig,
    ExportError,
    ExportRegistry,
    ExportUnit,
    UnknownExport,
    name_problem,
    parse_export,
)
from ferry.migrate.blockers import BadBlocker
from ferry.migrate.manager import (
    CannotBreak,
    MigrationBlocked,
    MirrorBusy,
    MirrorManager,
    NotMirroring,
)
from ferry.migrate.options import (
    COPY_MODES,
    CopyMode,
    Destination,
    FinishAction,
    MirrorError,
    MirrorOptions,
    StartOutcome,
    parse_destination,
)
from ferry.serve.acl import Acl, AclError
from ferry.serve.server import NBDServer

Params = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    text: str
    value: Any = field(default=None)

    def line(self) -> str:
        return f"{self.status}: {self.text}\n"


Command = Callable[[Sequence[str], Params], "Reply | Deferred[Reply]"]

TakeConnection = Callable[[socket.socket], object]
Upgrade = Callable[[Params], "str | TakeConnection"]
"""A JSON method that takes the control connection itself (``takeover``).

Called with the request's params on the reactor: a str is a refusal
(answered as error 1, and the connection goes on); a function is given
the connection's socket (blocking, this process's own duplicate), and the
control server forgets the connection: what follows on it is the
function's business.
"""


class CommandTable(Protocol):
    """What the control socket runs commands on: a node's :class:`Commands`, or a proxy's."""

    @property
    def table(self) -> Mapping[str, Command]:
        """The commands by name (an unknown JSON method is answered without running any)."""
        ...

    @property
    def upgrades(self) -> Mapping[str, Upgrade]:
        """The JSON methods that take the connection itself (none but a node's)."""
        ...

    def run(
        self, name: str, args: Sequence[str], params: Params | None = None
    ) -> Reply | Deferred[Reply]: ...


def dispatch(
    table: Mapping[str, Command], name: str, args: Sequence[str], params: Params | None
) -> Reply | Deferred[Reply]:
    """Run the command ``name`` of ``table``; a missing or unknown one is an error reply."""
    if not name:
        return Reply(9, "missing command")
    command = table.get(name)
    if command is None:
        return Reply(10, "unknown command")
    return command(args, params or {})


class ExportHost(Protocol):
    """What adds and removes a node's exports (``ferry.node.Node``)."""

    def add_export(self, config: ExportConfig) -> Deferred[ExportUnit]:
        """Serve ``config``; fails with :class:`~ferry.exports.ExportError` saying why not."""
        ...

    def remove_export(self, name: str, *, force: bool = False) -> Deferred[None]:
        """Stop serving ``name`` once its clients are drained; fails with ExportBusy while
        it migrates (unless ``force``)."""
        ...


class Commands:
    """The commands a running ferry node accepts, by name."""

    def __init__(
        self,
        server: NBDServer,
        exports: ExportRegistry,
        *,
        default_deny: bool,
        host: ExportHost | None = None,
    ) -> None:
        self._server = server
        self._exports = exports
        self._default_deny = default_deny
        self._host = host
        self.table: dict[str, Command] = {
            "status": self.status,
            "acl": self.acl,
            "mirror": self.mirror,
            "break": self.break_mirror,
            "mirror_max_bps": self.mirror_max_bps,
            "migration": self.migration,
            "wait": self.wait,
            "block": self.block,
            "unblock": self.unblock,
            "export.add": self.export_add,
            "export.remove": self.export_remove,
            "export.list": self.export_list,
        }
        #: JSON methods that take the connection itself, by name (the node adds
        #: ``takeover``); see :data:`Upgrade`.
        self.upgrades: dict[str, Upgrade] = {}

    def run(
        self, name: str, args: Sequence[str], params: Params | None = None
    ) -> Reply | Deferred[Reply]:
        return dispatch(self.table, name, args, params)

    def _unit(self, params: Params) -> ExportUnit:
        """The export a command is about: ``params["export"]``, or the default one."""
        name = params.get("export")
        if name is not None and not isinstance(name, str):
            raise UnknownExport(f"export must be a name, not {name!r}")
        return self._exports.get(name)

    def mirrors_of(self, name: str | None) -> MirrorManager:
        """Export ``name``'s (or the default one's) migrations: for its approver
        (``ferry.control.approvals``); UnknownExport, a LookupError, if there is none."""
        return self._exports.get(name).mirrors

    # -- always ---------------------------------------------------------------------

    def status(self, args: Sequence[str], params: Params) -> Reply:
        try:
            snapshot = self._unit(params).snapshot()
        except UnknownExport as error:
            return Reply(1, str(error))
        return Reply(0, snapshot.to_line(), snapshot.to_dict())

    def acl(self, args: Sequence[str], params: Params) -> Reply:
        """flexnbd's: replace the listener's ACL; JSON with ``export``: that export's."""
        for entry in args:
            try:
                Acl.parse([entry])
            except AclError:
                return Reply(1, f"bad spec: {entry}")
        if params.get("export") is None:
            acl = Acl.parse(args, default_deny=self._default_deny)
            disconnected = self._server.replace_acl(acl)
            return Reply(0, "updated", {"acl": acl.entries(), "disconnected": disconnected})
        try:
            unit = self._unit(params)
        except UnknownExport as error:
            return Reply(1, str(error))
        acl = Acl.parse(args, default_deny=unit.export.acl.default_deny)
        disconnected = self._server.replace_export_acl(unit.name, acl)
        value = {"export": unit.name, "acl": acl.entries(), "disconnected": disconnected}
        return Reply(0, "updated", value)

    # -- the exports ------------------------------------------------------------------

    def export_add(self, args: Sequence[str], params: Params) -> Reply | Deferred[Reply]:
        """JSON: serve a new export; params are its settings (``ferry.exports.EXPORT_KEYS``)."""
        if self._host is None:
            return Reply(1, "this node cannot add exports")
        if args:
            return Reply(1, "export.add takes its settings as params, not args")
        try:
            config = parse_export({k: v for k, v in params.items() if k != "args"})
        except BadExportConfig as error:
            return Reply(1, f"export.add: {error}")

        def added(unit: ExportUnit) -> Reply:
            return Reply(0, f"export {unit.name!r} added", unit.describe())

        return self._host.add_export(config).addCallbacks(added, _refused)

    def export_remove(self, args: Sequence[str], params: Params) -> Reply | Deferred[Reply]:
        """JSON: ``name`` (and ``force``): stop serving it once its clients are drained."""
        if self._host is None:
            return Reply(1, "this node cannot remove exports")
        unknown = sorted(set(params) - {"name", "force", "args"})
        if unknown or args:
            return Reply(1, "export.remove takes only the params 'name' and 'force'")
        name = params.get("name")
        force = params.get("force", False)
        if not isinstance(name, str) or not name:
            return Reply(1, "export.remove: name must be an export's name")
        if not isinstance(force, bool):
            return Reply(1, "export.remove: force must be true or false")
        try:
            removing = self._host.remove_export(name, force=force)
        except UnknownExport as error:
            return Reply(1, str(error))
        return removing.addCallbacks(
            lambda _: Reply(0, f"export {name!r} removed", {"removed": name}), _refused
        )

    def export_list(self, args: Sequence[str], params: Params) -> Reply:
        """Every export: name, file, mode, role state, clients, migration, lease."""
        rows = [unit.describe() for unit in self._exports]
        line = " ".join(f"{row['name']}={row['state']}" for row in rows) or "no exports"
        return Reply(0, line, rows)

    # -- migration ----------------------------------------------------------------------

    def mirror(self, args: Sequence[str], params: Params) -> Reply | Deferred[Reply]:
        """``mirror IP PORT [exit|unlink|nothing] [BIND] [MAX_BPS]`` (or ``mirror URI ...``:
        ``tcp:HOST:PORT``, ``unix:PATH``, ``exec:COMMAND``); JSON may add
        ``max_downtime`` (seconds), ``max_passes``, ``copy_mode`` (``background`` or
        ``write-blocking``) and ``dest_export``: the name of the
        export to migrate into (default: the destination's default export, or, when the
        command names an ``export``, an export of the same name)."""
        try:
            unit = self._unit(params)
        except UnknownExport as error:
            return Reply(1, str(error))
        mirrors = unit.mirrors
        if unit.config.max_downtime is not None and "max_downtime" not in params:
            params = {**params, "max_downtime": unit.config.max_downtime}
        parsed = _parse_mirror(args, params)
        if isinstance(parsed, Reply):
            return parsed
        destination, options = parsed
        dest_export = params.get("dest_export", unit.name if params.get("export") else "")
        if not isinstance(dest_export, str):
            return Reply(1, "bad dest_export: must be an export's name")
        problem = name_problem(dest_export)
        if problem is not None:
            return Reply(1, f"bad dest_export: {problem}")
        destination = dataclasses.replace(destination, export_name=dest_export)
        try:
            started = mirrors.mirror(destination, options)
        except MirrorBusy:
            return Reply(1, "mirror already running")
        except MigrationBlocked as error:
            return Reply(1, str(error), {"ok": False, "message": str(error), "detail": ""})
        except MirrorError as error:
            return Reply(1, str(error))

        def answer(outcome: StartOutcome) -> Reply:
            value = {"ok": outcome.ok, "message": outcome.message, "detail": outcome.detail}
            if outcome.ok or not outcome.detail:
                return Reply(0 if outcome.ok else 1, outcome.message, value)
            # flexnbd's words first, so its tooling still matches; then why.
            return Reply(1, f"{outcome.message}: {outcome.detail}", value)

        return started.addCallback(answer)

    def block(self, args: Sequence[str], params: Params) -> Reply:
        """``block REASON`` (JSON: ``reason``): refuse ``mirror`` of the export until unblocked."""
        try:
            unit = self._unit(params)
        except UnknownExport as error:
            return Reply(1, str(error))
        reason = _reason(args, params)
        if reason is None:
            return Reply(1, "block takes one reason")
        try:
            added = unit.mirrors.blockers.add(reason)
        except BadBlocker as error:
            return Reply(1, str(error))
        blockers = unit.mirrors.blocked_by()
        if not added:
            return Reply(0, f"already blocked: {reason}", {"blockers": blockers})
        return Reply(0, f"blocked: {reason}", {"blockers": blockers})

    def unblock(self, args: Sequence[str], params: Params) -> Reply:
        """``unblock REASON`` removes that blocker; ``unblock`` alone, every one set by hand."""
        try:
            unit = self._unit(params)
        except UnknownExport as error:
            return Reply(1, str(error))
        reason = _reason(args, params)
        if reason is None and (args or params.get("reason") is not None):
            return Reply(1, "unblock takes one reason, or none for all")
        removed = unit.mirrors.blockers.remove(reason)
        value = {"removed": removed, "blockers": unit.mirrors.blocked_by()}
        if reason is not None and not removed:
            return Reply(1, f"not blocked: {reason}", value)
        text = "; ".join(removed) if removed else "nothing was blocked"
        return Reply(0, f"unblocked: {text}" if removed else text, value)

    def break_mirror(self, args: Sequence[str], params: Params) -> Reply:
        try:
            self._unit(params).mirrors.cancel()
        except UnknownExport as error:
            return Reply(1, str(error))
        except NotMirroring:
            return Reply(1, "not mirroring")
        except CannotBreak as error:
            return Reply(1, str(error))
        return Reply(0, "mirror stopped")

    def mirror_max_bps(self, args: Sequence[str], params: Params) -> Reply:
        try:
            mirrors = self._unit(params).mirrors
        except UnknownExport as error:
            return Reply(1, str(error))
        if not mirrors.running:
            return Reply(1, "Not currently mirroring")
        if len(args) != 1:
            return Reply(1, "Bad format")
        limit = _byte_rate(args[0])
        if limit is None:
            return Reply(1, "max_bps couldn't be parsed")
        try:
            mirrors.set_max_bps(limit or None)
        except NotMirroring:
            return Reply(1, "Not currently mirroring")
        return Reply(0, "updated")

    def migration(self, args: Sequence[str], params: Params) -> Reply:
        """JSON: the progress of the current (or last) migration."""
        try:
            progress = self._unit(params).mirrors.progress()
        except UnknownExport as error:
            return Reply(1, str(error))
        return Reply(0, str(progress["line"]), progress)

    def wait(self, args: Sequence[str], params: Params) -> Reply | Deferred[Reply]:
        """JSON: answers when the current migration has ended, with how it ended."""
        try:
            mirrors = self._unit(params).mirrors
        except UnknownExport as error:
            return Reply(1, str(error))
        return mirrors.finished().addCallback(lambda _: self.migration(args, params))


def _refused(failure: Failure) -> Reply | Failure:
    """An export the node would not add or remove: the one line that says why."""
    if not isinstance(failure.value, ExportError | ExportBusy | UnknownExport):
        return failure  # a fault of ours: the caller logs it and answers "internal error"
    return Reply(1, str(failure.value))


def _reason(args: Sequence[str], params: Params) -> str | None:
    """A blocker's reason: one line's argument (the line form), or ``reason`` (JSON)."""
    reason = params.get("reason")
    if reason is not None:
        return reason if isinstance(reason, str) and not args else None
    if len(args) == 1:
        return args[0]
    return None


def _parse_mirror(args: Sequence[str], params: Params) -> Reply | tuple[Destination, MirrorOptions]:
    """``IP PORT [ACTION] [BIND] [MAX_BPS]`` (flexnbd's), or ``URI [ACTION] [BIND] [MAX_BPS]``
    with URI ``tcp:HOST:PORT``, ``unix:PATH`` or ``exec:COMMAND`` (QEMU's)."""
    if args and args[0].partition(":")[0] in ("tcp", "unix", "exec"):
        try:
            destination = parse_destination(args[0])
        except ValueError as error:
            return Reply(1, str(error))
        rest = list(args[1:])
        if len(rest) > 3:
            return Reply(1, "unrecognised parameters to mirror")
    else:
        if len(args) < 2:
            return Reply(1, "mirror takes at least two parameters")
        if len(args) > 5:
            return Reply(1, "unrecognised parameters to mirror")
        if not _is_ip(args[0]):
            return Reply(1, "bad IP address")
        try:
            port = int(args[1])
        except ValueError:
            return Reply(1, "bad IP port number")
        if not 0 < port <= 65535:
            return Reply(1, "bad IP port number")
        destination = Destination(args[0], port)
        rest = list(args[2:])
    action = FinishAction.EXIT
    if rest:
        try:
            action = FinishAction(rest[0])
        except ValueError:
            return Reply(1, "action must be 'exit', 'unlink' or 'nothing'")
    bind = None
    if len(rest) > 1 and rest[1]:
        if not _is_ip(rest[1]):
            return Reply(1, "bad bind address")
        if destination.transport != "tcp":
            return Reply(1, f"a bind address is for TCP, not {destination.transport}:")
        bind = rest[1]
    max_bps = None
    if len(rest) > 2:
        max_bps = _byte_rate(rest[2])
        if max_bps is None:
            return Reply(1, "max_bps couldn't be parsed")
    extra: dict[str, Any] = {}
    for key, whole in (("max_downtime", False), ("max_passes", True), ("reply_timeout", False)):
        if key in params:
            value = _positive(params[key], whole=whole)
            if value is None:
                kind = "a whole number" if whole else "a number of seconds"
                return Reply(1, f"bad {key}: must be {kind} greater than 0")
            extra[key] = value
    if "retry_for" in params:
        seconds = _positive(params["retry_for"], whole=False)
        if seconds is None:
            return Reply(1, "bad retry_for: must be a number of seconds greater than 0")
        extra["retry_for"] = seconds
    if "max_retries" in params:
        retries = params["max_retries"]
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            return Reply(1, "bad max_retries: must be a whole number, 0 or more")
        extra["max_retries"] = retries
    if "flexnbd" in params:
        if not isinstance(params["flexnbd"], bool):
            return Reply(1, "bad flexnbd: must be true or false")
        extra["flexnbd"] = params["flexnbd"]
    if "copy_mode" in params:
        mode = params["copy_mode"]
        if not isinstance(mode, str) or mode not in {m.value for m in CopyMode}:
            return Reply(1, f"bad copy_mode: must be {COPY_MODES}")
        extra["copy_mode"] = CopyMode(mode)
    try:
        options = MirrorOptions(max_bps=max_bps or None, action=action, **extra)
    except ValueError as error:
        return Reply(1, str(error))
    return dataclasses.replace(destination, bind=bind), options


def _positive(value: object, *, whole: bool) -> int | float | None:
    """``value`` as a JSON number above 0 (an integer if ``whole``, else finite seconds), or None.

    Only numbers: a string such as "NaN" or "inf" that ``float()`` would
    take, or a boolean (an int to Python), is not one.  Seconds are a float:
    an integer too large for one is refused here, not by the job later.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if whole:
        return value if isinstance(value, int) and value > 0 else None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _byte_rate(text: str) -> int | None:
    """A non-negative integer of bytes per second; 0 means no limit."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None
