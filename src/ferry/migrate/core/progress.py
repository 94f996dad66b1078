"""The migration status fields as one value, and the one-line progress of ``--wait``.

:class:`MigrationProgress` has one attribute per migration field of
:class:`ferry.status.StatusSnapshot`, spelled the same, so the code
that builds a snapshot fills every migration field from one object in one
place (``StatusSnapshot(..., **progress.status_fields())``) and a test
checks the names against the snapshot's.  Fields that do not apply are
None and are left out of every rendering, as in the snapshot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["MigrationProgress", "estimate_seconds_left", "format_bytes", "format_seconds"]


def estimate_seconds_left(
    bytes_left: int, speed: float | None, dirty_rate: float, max_downtime: float
) -> float | None:
    """Time to the end of the migration; None when it cannot be estimated.

    While passes run, what is left shrinks at ``speed - dirty_rate`` (the
    stream drains it, clients dirty it again) until the last pass can take
    the rest in ``max_downtime``; then that last pass.  If clients dirty as
    fast as the stream drains, no estimate is honest (auto-converge will
    change the rates), so the answer is None rather than a large number.
    """
    if bytes_left <= 0:
        return 0.0
    if speed is None or speed <= 0:
        return None
    switchover = speed * max_downtime
    if bytes_left <= switchover:
        return bytes_left / speed
    if dirty_rate >= speed:
        return None
    return (bytes_left - switchover) / (speed - dirty_rate) + max_downtime


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """``812 MiB``, ``1.5 GiB``, ``0 B``: three significant digits at most."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"


def format_seconds(seconds: float | None) -> str:
    """``0.2 s``, ``45 s``, ``3m05s``, ``2h01m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """Every migration status field at one instant (names as in ``StatusSnapshot``).

    ``phase`` (the migration chart's state) is for the progress line only;
    the snapshot's ``state`` field is the role, not this.
    """

    is_migrating: bool
    phase: str | None = None
    migration_pass: int | None = None
    pass_dirty_bytes: int | None = None
    pass_clean_bytes: int | None = None
    migration_duration: float | None = None
    migration_speed: int | None = None
    migration_speed_limit: int | None = None
    migration_seconds_left: float | None = None
    migration_bytes_left: int | None = None
    expected_downtime_ms: int | None = None
    last_downtime_ms: int | None = None

    def status_fields(self) -> dict[str, Any]:
        """The snapshot's fields this object owns, ``is_mirroring`` included (flexnbd's name)."""
        fields = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "phase"
        }
        fields["is_mirroring"] = self.is_migrating
        return fields

    def render(self) -> str:
        """One line for ``ferry mirror --wait``: ``pass 3, 812 MiB/s, 120 MiB left, ETA 0.2 s``."""
        if self.migration_pass is None:
            return self.phase or ("migrating" if self.is_migrating else "not migrating")
        parts = [f"pass {self.migration_pass}"]
        if self.migration_speed is not None:
            speed = f"{format_bytes(self.migration_speed)}/s"
            if self.migration_speed_limit is not None:
                speed += f" (limit {format_bytes(self.migration_speed_limit)}/s)"
            parts.append(speed)
        if self.migration_bytes_left is not None:
            parts.append(f"{format_bytes(self.migration_bytes_left)} left")
        parts.append(f"ETA {format_seconds(self.migration_seconds_left)}")
        if self.phase in ("quiescing", "committing"):
            parts.append(self.phase)
        return ", ".join(parts)
