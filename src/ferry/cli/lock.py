"""``ferry lock``: the lease subsystem for any command, not just ``serve``.

``ferry lock run`` holds a lease while a command runs and kills the command
if the lease is lost (:mod:`ferry.lease.supervise`), so a cron job, a
backup or a maintenance script can share a lockspace with ferry nodes.
``ferry lock status`` says who holds what, with modes and fencing tokens.

This module only reads the command line; the work is imported when a lock
command runs, so every other ``ferry`` mode starts as fast as before.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, runtime_checkable

from ferry.cli.errors import UserError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ferry.lease.backend import Holder, LeaseBackend
    from ferry.lease.spec import LockspaceSpec

__all__ = ["ListingLockspace", "add_lock_commands", "format_holders", "settle"]

_T = TypeVar("_T")

_SPEC_HELP = (
    "the lockspace: local:DIR or etcd:http[s]://HOST:PORT[,HOST:PORT...][?OPTIONS] "
    "(default: the embedded local lockspace)"
)


@runtime_checkable
class ListingLockspace(Protocol):
    """A lockspace that can list every held resource at once (``lock status`` without a name).

    Both of ferry's backends can; a backend that cannot makes ``--resource``
    required.
    """

    def inquire_all(self) -> Deferred[dict[str, tuple[Holder, ...]]]: ...


def add_lock_commands(modes: argparse._SubParsersAction[Any]) -> None:
    """Add ``lock run`` and ``lock status`` to ``ferry``'s modes (called by ``build_parser``)."""
    lock = modes.add_parser("lock", help="run a command under a lease; show who holds leases")
    # The same parser class as every other mode: one-line usage errors, exit 2.
    actions = lock.add_subparsers(dest="lock_mode", metavar="ACTION", parser_class=type(lock))
    _add_run(actions)
    _add_status(actions)


def _add_run(actions: argparse._SubParsersAction[Any]) -> None:
    run = actions.add_parser(
        "run",
        help="hold a lease while a command runs; kill the command if the lease is lost",
        description="Take the lease, run COMMAND, release the lease when it exits; exit with "
        "its status. If the lease is held by someone else, say who and exit 1 without "
        "running COMMAND. If the lease is lost, kill COMMAND with SIGKILL and exit 137. "
        "SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are passed on to COMMAND.",
    )
    _lockspace_option(run)
    run.add_argument("--resource", required=True, metavar="NAME", help="the lease's name")
    modes = run.add_mutually_exclusive_group()
    modes.add_argument(
        "--shared", action="store_true", help="share the lease with other shared holders"
    )
    modes.add_argument(
        "--readonly", action="store_true", help="share it, as a reader (excludes exclusive only)"
    )
    run.add_argument(
        "--ttl",
        type=_seconds,
        metavar="SECONDS",
        help="etcd only: how long the lease outlives ferry's last renewal (default 10)",
    )
    run.add_argument("--owner", metavar="TEXT", help="who holds it (default HOST:PID:lock-run)")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="log the lease's renewals and failures"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]")
    run.set_defaults(run=lambda args: run_lock(run, args))


def _add_status(actions: argparse._SubParsersAction[Any]) -> None:
    status = actions.add_parser(
        "status",
        help="show who holds a lease (or every lease), with modes and tokens",
        description="Print one line per holder: RESOURCE: OWNER (MODE, token N). A local "
        "lockspace records no resource names: without --resource it lists lock files.",
    )
    _lockspace_option(status)
    status.add_argument("--resource", metavar="NAME", help="the lease to ask about")
    status.set_defaults(run=lambda args: run_status(status, args))


def _lockspace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lockspace", type=_lockspace, metavar="SPEC", help=_SPEC_HELP)


def _lockspace(text: str) -> LockspaceSpec:
    from ferry.lease.spec import parse_lockspace

    try:
        return parse_lockspace(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
    return value


def _usage(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)  # one line, exit 2


# -- lock run ---------------------------------------------------------------------


def run_lock(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``ferry lock run``: the command's exit status (see :mod:`ferry.lease.supervise`)."""
    from ferry.lease.backend import LeaseError, LeaseMode
    from ferry.lease.local import MAX_OWNER_BYTES
    from ferry.lease.spec import EtcdSpec
    from ferry.lease.supervise import LockRun, LockRunError, run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        _usage(parser, "name the command to run: lock run ... -- COMMAND [ARG ...]")
    owner = args.owner or ""
    if args.owner is not None and not 0 < len(owner.encode()) <= MAX_OWNER_BYTES:
        _usage(parser, f"--owner must be 1 to {MAX_OWNER_BYTES} bytes")
    try:
        spec = args.lockspace or _default_lockspace()
    except LeaseError as error:
        raise UserError(str(error)) from None
    if args.ttl is not None and not isinstance(spec, EtcdSpec):
        _usage(parser, "--ttl is for an etcd lockspace; a local lock lives as long as ferry")
    mode = LeaseMode.SHARED if args.shared else LeaseMode.EXCLUSIVE
    if args.readonly:
        mode = LeaseMode.READONLY
    job = LockRun(str(spec), args.resource, tuple(command), mode, owner, args.ttl)
    _start_logging(verbose=args.verbose)
    try:
        return run(job)
    except LockRunError as error:
        print(f"ferry: {error}", file=sys.stderr)
        return error.status


def _default_lockspace() -> LockspaceSpec:
    from ferry.lease.spec import default_lockspace

    return default_lockspace()


def _start_logging(*, verbose: bool) -> None:
    """Errors only by default: ``lock run`` speaks in its own one-line messages.

    The lease manager's warnings (a fence, a failed renewal) would repeat
    them, timestamped; ``--verbose`` shows them and the renewals too.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.error
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# -- lock status ------------------------------------------------------------------


def run_status(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``ferry lock status``: one line per holder, or who is free."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from ferry.lease.backend import LeaseError
    from ferry.lease.spec import open_lockspace

    try:
        spec = args.lockspace or _default_lockspace()
        backend = open_lockspace(spec, reactor=reactor)
    except LeaseError as error:
        raise UserError(str(error)) from None
    if args.resource is None and not isinstance(backend, ListingLockspace):
        _usage(parser, f"{spec} cannot list its leases: name one with --resource")
    try:
        held = settle(reactor, lambda: Deferred.fromCoroutine(_ask(backend, args.resource)))
    except LeaseError as error:
        raise UserError(f"{spec}: {error}") from None
    for line in format_holders(held, args.resource, str(spec)):
        print(line)
    return 0


async def _ask(backend: LeaseBackend, resource: str | None) -> dict[str, tuple[Holder, ...]]:
    """The holders of ``resource``, or of every resource; the lockspace closed afterwards."""
    try:
        if resource is not None:
            return {resource: await backend.inquire(resource)}
        assert isinstance(backend, ListingLockspace)
        return await backend.inquire_all()
    finally:
        await backend.close()


def format_holders(
    held: dict[str, tuple[Holder, ...]], resource: str | None, spec: str
) -> list[str]:
    """``NAME: OWNER (MODE, token N)`` per holder; a free resource says so."""
    lines = [f"{name}: {holder.describe()}" for name, holders in held.items() for holder in holders]
    if lines:
        return lines
    if resource is not None:
        return [f"nobody holds {resource}"]
    return [f"nobody holds a lease in {spec}"]


def settle(reactor: Any, start: Callable[[], Deferred[_T]]) -> _T:
    """Run the reactor until the Deferred ``start`` makes has fired; its result (or raise)."""
    from twisted.python.failure import Failure

    outcome: list[Any] = []

    def begin() -> None:
        d = start()
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    value: _T = result
    return value
