"""``--takeover SOCK`` of ``ferry serve`` and ``ferry daemon``: ask, then take the node over.

The two modes differ in what the operator may write beside ``--takeover``
(serve's options, a daemon's file) and share the rest: what the old
process serves (its ``served``, asked before anything is held), and the
takeover itself (:meth:`ferry.node.Node.take_over`), whose refusal is the
one line the user sees (exit 1; the old process serves on).
"""

from __future__ import annotations

from typing import Any

from ferry.cli.errors import UserError

__all__ = ["take_over", "takeover_described"]


def takeover_described(path: str) -> dict[str, Any]:
    """What the ferry at control socket ``path`` serves (``--takeover``), or a UserError."""
    from ferry.takeover.take import TakeoverError, describe

    try:
        return describe(path)
    except TakeoverError as error:
        raise UserError(f"--takeover {path}: {error}") from None


def take_over(
    node: Any,
    path: str,
    served: dict[str, Any],
    given: dict[str, Any],
    formats: list[int] | None,
) -> None:
    """``node.take_over``; its refusal is a UserError (``--takeover-format``: a test's)."""
    from ferry.node import StartupError
    from ferry.takeover.state import TAKEOVER_FORMAT

    try:
        node.take_over(
            path, served=served, given=given, formats=frozenset(formats or [TAKEOVER_FORMAT])
        )
    except StartupError as error:
        raise UserError(f"--takeover {path}: {error}") from None
