"""What a reload does: the difference between the file as it was read and as it is now.

A reload acts on what *changed in the file* since it was last read, and
leaves everything else as it is:

* an ``[[export]]`` table that appeared starts that export;
* a table that went stops its export (its clients drained first);
* a table that changed, of an export that runs, has the change applied
  where it can be while the export runs (:data:`LIVE_KEYS`: its ACL, whether
  an empty ACL denies, its migrations' ``max_downtime``) and the rest named:
  ``file``, ``mode``, ``read_only`` and ``resource`` are the export's
  identity, so the export must be removed and added to change them;
* a table that changed, of an export that does not run (handed away by a
  migration, or removed at run time), starts it with its new settings;
* a table that did not change is left alone, running or not: an export a
  migration took elsewhere does not come back because of an unrelated edit,
  and one added at run time (``export.add``) is not the file's to stop.

The node's own keys (``addr``, ``port``, ``sock``, ...) are fixed while it
runs: one that differs from the running node's is named, at every reload,
until the daemon is restarted.

This module decides; :mod:`ferry.daemon.service` carries a plan out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ferry.daemon.config import NODE_KEYS, DaemonConfig
from ferry.exports import ExportConfig

__all__ = ["LIVE_KEYS", "ExportChange", "ReloadPlan", "plan_reload"]

#: An export's settings a reload applies while the export runs.
LIVE_KEYS: Final = ("acl", "default_deny", "max_downtime")


@dataclass(frozen=True)
class ExportChange:
    """A running export whose table changed: what applies now, and what cannot."""

    config: ExportConfig  # the new table
    applied: tuple[str, ...]
    not_applied: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.config.export_name


@dataclass(frozen=True)
class ReloadPlan:
    """What one reload starts, stops and changes; what it cannot change is named."""

    start: tuple[ExportConfig, ...] = ()
    stop: tuple[str, ...] = ()
    change: tuple[ExportChange, ...] = ()
    node_keys: tuple[str, ...] = field(default=())  # differ from the running node's

    def summary(self) -> str:
        """One line: what was done, and what was not and why."""
        done = []
        if self.start:
            done.append("started " + ", ".join(c.export_name for c in self.start))
        if self.stop:
            done.append("stopped " + ", ".join(self.stop))
        applied = [f"{c.name} ({', '.join(c.applied)})" for c in self.change if c.applied]
        if applied:
            done.append("changed " + ", ".join(applied))
        text = "; ".join(done) or "no change"
        refused = [f"{c.name}.{key}" for c in self.change for key in c.not_applied]
        notes = []
        if refused:
            notes.append(f"{', '.join(refused)} (remove the export and add it again)")
        if self.node_keys:
            notes.append(f"{', '.join(self.node_keys)} (restart the daemon)")
        if notes:
            text += "; not applied while running: " + "; ".join(notes)
        return text


def plan_reload(
    running_node: DaemonConfig,
    last_read: DaemonConfig,
    new: DaemonConfig,
    running: Mapping[str, ExportConfig],
) -> ReloadPlan:
    """The plan that takes the daemon from ``last_read`` to ``new``.

    ``running_node`` is the file the daemon started with (its node's keys
    are the running ones); ``running`` the exports that run now, with their
    current settings, by name.
    """
    before = last_read.by_name()
    after = new.by_name()
    start: list[ExportConfig] = []
    change: list[ExportChange] = []
    for name, config in after.items():
        current = running.get(name)
        if current is not None:
            differ = _differing(current, config)
            if differ:
                live = tuple(key for key in differ if key in LIVE_KEYS)
                rest = tuple(key for key in differ if key not in LIVE_KEYS)
                change.append(ExportChange(config, live, rest))
        elif before.get(name) != config:
            start.append(config)
    stop = [name for name in before if name not in after and name in running]
    return ReloadPlan(
        start=tuple(start),
        stop=tuple(stop),
        change=tuple(change),
        node_keys=_node_keys(running_node, new),
    )


def _differing(old: ExportConfig, new: ExportConfig) -> list[str]:
    was, now = old.settings(), new.settings()
    return [key for key in now if was[key] != now[key]]


def _node_keys(old: DaemonConfig, new: DaemonConfig) -> tuple[str, ...]:
    was, now = _node_settings(old), _node_settings(new)
    return tuple(key for key in NODE_KEYS if was[key] != now[key])


def _node_settings(config: DaemonConfig) -> dict[str, object]:
    node = config.node
    values: Sequence[object] = (
        node.addr,
        node.port,
        node.sock,
        node.metrics,
        node.lockspace,
        node.trace,
        config.log,
        None if node.hooks is None else node.hooks.settings(),
        None if node.hooks is None else node.hooks.timeout,
        node.tls,
        node.tls_certificates,
        node.tls_verify_peer,
        node.tls_allowed_subjects,
        node.max_clients,
        node.max_connections_per_address,
    )
    return dict(zip(NODE_KEYS, values, strict=True))
