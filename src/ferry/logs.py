"""Log output for the CLI: readable lines on stderr, and optionally a JSON file.

stderr is for the operator, at the level ``-v`` / ``-q`` choose; Twisted's
own chatter (factories starting and stopping, ports opening and closing) is
debug there, shown only with ``-v``: an operator reads ferry's lines.  The JSON
file (``--log FILE``) is for machines: it takes every event from debug up
whatever the verbosity, one JSON object per line (twisted.logger's
``eventAsJSON``; ``eventsFromJSONLogFile`` reads it back), and each event
carries the process's identifiers (``export``) unless it names its own.
Transitions are logged with the trace's own fields (see
:func:`ferry.trace.log_transitions`), so a log and a trace join on
``machine``, ``instance``, ``event`` and ``time``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Final, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import provider

from ferry.appender import Appender
from ferry.safepath import UnsafePath, open_append

__all__ = ["LogFileError", "open_log_file", "start_logging", "with_fields"]


class LogFileError(Exception):
    """The ``--log`` file cannot be opened; the message says why, in one line."""


def open_log_file(path: str) -> IO[str]:
    """Open ``path`` for appending (a log outlives runs, like a trace), line-buffered.

    Never through a symlink, never someone else's file, never in a directory
    others could swap it in (:func:`ferry.safepath.open_append`).
    """
    try:
        # Written by a thread of its own: the reactor logs, it does not wait on the disk.
        return cast(IO[str], Appender(open_append(path, "log file"), what="log file"))
    except UnsafePath as unsafe:
        raise LogFileError(str(unsafe)) from None
    except OSError as error:
        raise LogFileError(f"log file {path}: {error.strerror or error}") from None


def start_logging(
    *,
    verbose: bool = False,
    quiet: bool = False,
    json_file: IO[str] | None = None,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Log to stderr, and to ``json_file`` if given, with ``fields`` in every JSON event."""
    level = LogLevel.debug if verbose else LogLevel.warn if quiet else LogLevel.info
    predicates = [LogLevelFilterPredicate(defaultLogLevel=level)]
    if not verbose:
        predicates.insert(0, _quiet_twisted)
    observers: list[ILogObserver] = [
        FilteringLogObserver(textFileLogObserver(sys.stderr), predicates)
    ]
    if json_file is not None:
        # An empty record separator makes plain JSON lines (jq reads them;
        # eventsFromJSONLogFile detects the form).
        observers.append(with_fields(jsonFileLogObserver(json_file, ""), dict(fields or {})))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


_MAYBE = cast(PredicateResult, PredicateResult.maybe)
_NO = cast(PredicateResult, PredicateResult.no)
#: Twisted's own namespaces whose info lines are its business, not the operator's.
_TWISTED_CHATTER: Final = frozenset({"log_legacy", "twisted.internet.base"})
#: What Twisted itself says at info level about its factories.
_FACTORY_CHATTER: Final = frozenset(
    {"Starting factory {factory!r}", "Stopping factory {factory!r}"}
)


@provider(ILogFilterPredicate)
def _quiet_twisted(event: LogEvent) -> PredicateResult:
    """Twisted's chatter is debug on stderr: its legacy lines and its factories' comings
    and goings.  Its warnings and errors still show."""
    level: LogLevel = event.get("log_level", LogLevel.info)
    if level > LogLevel.info:
        return _MAYBE
    chatter = event.get("log_namespace") in _TWISTED_CHATTER
    chatter = chatter or event.get("log_format") in _FACTORY_CHATTER
    return _NO if chatter else _MAYBE


def with_fields(observer: ILogObserver, fields: dict[str, object]) -> ILogObserver:
    """``observer``, seeing ``fields`` in every event that does not set them itself.

    The event is copied, not changed: every observer gets the same dict, and
    the text observer must not start printing keys it was never given.
    """

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        observer({**fields, **event})

    return cast(ILogObserver, observe)
