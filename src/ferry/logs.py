"""Log output for the CLI: one readable line per event on stderr."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)


def start_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    level = LogLevel.debug if verbose else LogLevel.warn if quiet else LogLevel.info
    observer = textFileLogObserver(sys.stderr)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False,
    )
