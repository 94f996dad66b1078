"""Running a node's reactor from the command line: until it is stopped, or it refuses to start.

``ferry serve``, ``listen`` and ``daemon`` start a node, then run the reactor
until SIGINT or SIGTERM, shutting the node down before the reactor stops.
A refusal to start (:class:`~ferry.node.StartupError`) -- before the reactor
runs, or after, from a lockspace that answers later -- is the one line the
user sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from ferry.cli.errors import UserError

__all__ = ["run_until_stopped"]


def run_until_stopped(
    reactor: Any, started: Deferred[Any], shutdown: Callable[[], Any], *, prefix: str = ""
) -> None:
    """Run ``reactor`` unless ``started`` fails; ``shutdown`` runs before it stops.

    A StartupError becomes a UserError (``prefix`` before its line); anything
    else is raised as it is.
    """
    from ferry.node import StartupError

    refusal: list[BaseException] = []

    def refused(failure: Any) -> None:
        refusal.append(failure.value)
        if reactor.running:
            reactor.stop()

    started.addErrback(refused)
    if not refusal:
        reactor.addSystemEventTrigger("before", "shutdown", shutdown)
        reactor.run()
    if refusal:
        if isinstance(refusal[0], StartupError):
            raise UserError(f"{prefix}{refusal[0]}") from None
        raise refusal[0]
