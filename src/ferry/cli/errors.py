"""What every ``ferry`` mode raises for a problem the user must fix."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Shown as ``ferry: <message>`` with exit status 1: a problem with the world."""
