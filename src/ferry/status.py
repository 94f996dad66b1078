"""The status snapshot: the one place where a status field is defined.

The flexnbd-style status line, the JSON RPC and the Prometheus collector all
render a :class:`StatusSnapshot`; none of them names a field on its own.
Each field says, in its metadata, how it is written on the line and which
Prometheus series (in base units) carries it, so adding a field here is
enough for it to appear everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, unquote


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one status field is exported.

    ``metric`` is the Prometheus name without the ``ferry_`` prefix (for a
    state field: the machine's name); ``scale`` turns the line's unit into
    the metric's base unit (milliseconds to seconds); ``kind`` is ``gauge``,
    ``state`` (a state set), ``info`` (a text value, carried as a label of
    a series whose value is 1: ``ferry_<metric>_info{<field>="..."}``) or
    ``list`` (texts: the line joins them with commas, each percent-encoded,
    JSON has the list, and the series ``ferry_<metric>`` counts them).
    """

    metric: str
    help: str
    scale: float = 1.0
    kind: str = "gauge"


def _spec(metric: str, help: str, *, scale: float = 1.0, kind: str = "gauge") -> Any:
    return field(default=None, metadata={"spec": FieldSpec(metric, help, scale, kind)})


def _info(metric: str, help: str) -> Any:
    """A text field: exported as ``ferry_<metric>_info{export, <field>=value} 1``."""
    return _spec(metric, help, kind="info")


def _list(metric: str, help: str) -> Any:
    """A list of texts: one field on the line, a list in JSON, their number as a gauge."""
    return _spec(metric, help, kind="list")


def _state(machine: str, help: str) -> Any:
    """A state field: exported as ``ferry_state{machine=...,state=...}``, a state set."""
    return _spec(machine, help, kind="state")


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Every status field of one export at one instant.

    Fields that do not apply (no migration running, no lease) are ``None``
    and are left out of every rendering.  The order of the fields is the
    order of the status line: flexnbd's fields first, so its tooling reads
    ours unchanged.
    """

    export: str = field(metadata={"label": True})
    pid: int | None = _spec("pid", "Process id of the server")
    size: int | None = _spec("size_bytes", "Size of the image in bytes")
    is_mirroring: bool | None = _spec(
        "is_mirroring", "Same as is_migrating, kept for flexnbd tooling"
    )
    clients_allowed: bool | None = _spec(
        "clients_allowed", "Whether new client connections are accepted"
    )
    num_clients: int | None = _spec("num_clients", "Client connections in transmission")
    has_control: bool | None = _spec(
        "has_control", "Whether this server is the one that accepts writes for the image"
    )
    is_migrating: bool | None = _spec("is_migrating", "Whether a migration job is running")
    state: str | None = _state("role", "Role state of the export")
    migration_pass: int | None = _spec("migration_pass", "Number of the current migration pass")
    pass_dirty_bytes: int | None = _spec(
        "pass_dirty_bytes", "Bytes the current pass has still to copy"
    )
    pass_clean_bytes: int | None = _spec("pass_clean_bytes", "Bytes the current pass need not copy")
    migration_duration: float | None = _spec(
        "migration_duration_seconds", "Time since the migration started"
    )
    migration_speed: int | None = _spec(
        "migration_speed_bytes_per_second", "Migration rate over a recent window"
    )
    migration_speed_limit: int | None = _spec(
        "migration_speed_limit_bytes_per_second", "Bandwidth limit of the migration"
    )
    migration_seconds_left: float | None = _spec(
        "migration_seconds_left", "Estimated time to the end of the migration"
    )
    migration_bytes_left: int | None = _spec(
        "migration_bytes_left_bytes", "Bytes the migration has still to copy"
    )
    expected_downtime_ms: int | None = _spec(
        "expected_downtime_seconds", "Expected client stall at switchover", scale=0.001
    )
    last_downtime_ms: int | None = _spec(
        "last_downtime_seconds", "Longest client stall of the last switchover", scale=0.001
    )
    lease_state: str | None = _state("lease", "State of the image's lease")
    lease_token: int | None = _spec("lease_token", "Fencing token of the held lease")
    address: str | None = _info("nbd", "Where NBD clients reach the export (HOST:PORT)")
    connections_moved: int | None = _spec(
        "connections_moved", "Client connections that moved with the image at the last handoff"
    )
    connections_aborted: int | None = _spec(
        "connections_aborted",
        "Client connections disconnected at the last handoff instead of moving",
    )
    can_move_connections: bool | None = _spec(
        "can_move_connections",
        "Whether this host can move client connections at a handoff (TCP_REPAIR, nftables)",
    )

    blockers: tuple[str, ...] | None = _list(
        "migration_blockers", "Reasons that keep the export from migrating (their number)"
    )
    migration_last_failure: str | None = _info(
        "migration_last_failure",
        "Why the last attempt of the current (or last) migration failed; none if it did not",
    )
    copy_mode: str | None = _info(
        "copy_mode",
        "How the current (or last) migration copies client writes: background (marked "
        "dirty, copied by a later pass) or write-blocking (sent to the destination at once)",
    )

    def fields(self) -> Iterator[tuple[str, Any, FieldSpec]]:
        """The present fields in line order, with their export specs."""
        for f in dataclasses.fields(self):
            spec = f.metadata.get("spec")
            if spec is None:
                continue
            value = getattr(self, f.name)
            if value is not None:
                yield f.name, value, spec

    def to_line(self) -> str:
        """flexnbd's status line: ``key=value`` pairs separated by one space."""
        return " ".join(f"{name}={render_value(value)}" for name, value, _ in self.fields())

    def to_dict(self) -> dict[str, Any]:
        """The present fields as JSON-ready values (the RPC's ``status`` answer)."""
        result: dict[str, Any] = {"export": self.export}
        result.update(
            (name, list(value) if isinstance(value, tuple) else value)
            for name, value, _ in self.fields()
        )
        return result


STATUS_FIELDS: Final = tuple(
    f.name for f in dataclasses.fields(StatusSnapshot) if "spec" in f.metadata
)


def render_value(value: object) -> str:
    """Booleans as ``true``/``false``; floats without needless noise.

    No value may contain a space or ``=``: the line is split on both.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
        return text or "0"
    if isinstance(value, tuple):
        # Each item percent-encoded (a space is %20), so none holds a space, ``=`` or ``,``.
        return ",".join(quote(str(item), safe="") for item in value)
    text = str(value)
    if " " in text or "=" in text:
        raise ValueError(f"status value {text!r} contains a space or '='")
    return text


def parse_list(value: str) -> list[str]:
    """The items of a list field's value on the line (``blockers=a%20b,c``)."""
    return [unquote(item) for item in value.split(",")] if value else []


def parse_line(line: str) -> dict[str, str]:
    """Split a status line into its fields (for clients and tests)."""
    pairs = (item.partition("=") for item in line.split())
    return {key: value for key, sep, value in pairs if sep}
