"""A daemon's file: TOML, read with the standard library, checked whole before anything runs.

The top-level keys are named like ``ferry serve``'s options (``addr``,
``port``, ``sock``, ``metrics``, ``lockspace``, ``trace``, ``log``,
``hooks``, ``hook_timeout``, and TLS's: ``tls``, ``tls_certificates``,
``tls_verify_peer``, ``tls_allowed_subjects``, and the connection limits
``max_clients`` and ``max_connections_per_address``); each ``[[export]]``
table is one export, with the settings ``export.add`` takes (:data:`ferry.exports.EXPORT_KEYS`)::

    addr = "127.0.0.1"
    port = 10809
    sock = "/run/ferry/ferry.sock"

    [[export]]
    name = "vm1"
    file = "/srv/disks/vm1.img"

A file that is wrong in any way -- not TOML, a key nobody knows, a value of
the wrong type, two exports of one name -- is refused whole with one line
saying which file, which table and which key (:class:`ConfigError`), and
nothing of it is used: not at start, not at a reload.

Relative paths (``file``, ``sock``, ``trace``, ``log``, a ``local:``
lockspace, ``tls_certificates``, ``tls_allowed_subjects``) are taken from
the file's own directory, so the file means the same whatever directory the
daemon was started in.  The TLS keys are checked together, as ``ferry
serve`` checks its options: ``tls = "on"`` or ``"require"`` needs
``tls_certificates``, ``tls_verify_peer`` needs TLS on, and
``tls_allowed_subjects`` needs ``tls_verify_peer``.  The certificates
themselves are read when the daemon starts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from ferry.exports import BadExportConfig, ExportConfig, parse_export
from ferry.hooks import HookConfig, parse_hooks
from ferry.lease.spec import parse_lockspace
from ferry.nbd.constants import TLSMode
from ferry.node import NO_LOCKSPACE, NodeConfig

__all__ = ["NODE_KEYS", "ConfigError", "DaemonConfig", "load_config", "parse_config"]

#: The top-level keys, in the order ``ferry serve`` lists its options.
NODE_KEYS: Final = (
    "addr",
    "port",
    "sock",
    "metrics",
    "lockspace",
    "trace",
    "log",
    "hooks",
    "hook_timeout",
    "tls",
    "tls_certificates",
    "tls_verify_peer",
    "tls_allowed_subjects",
    "max_clients",
    "max_connections_per_address",
)


class ConfigError(ValueError):
    """The daemon's file cannot be used; ``str`` is one line: the file, where, and why."""


@dataclass(frozen=True)
class DaemonConfig:
    """What a daemon's file says: the node, its exports, and the JSON log's path."""

    path: str
    node: NodeConfig
    exports: tuple[ExportConfig, ...]
    log: str | None = None

    def by_name(self) -> dict[str, ExportConfig]:
        """The exports by name, in the file's order."""
        return {export.export_name: export for export in self.exports}


def load_config(path: str) -> DaemonConfig:
    """Read and check the file at ``path``; :class:`ConfigError` says what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 (byte {error.start})") from None
    return parse_config(text, path)


def parse_config(text: str, path: str) -> DaemonConfig:
    """The configuration ``text`` (the contents of ``path``) describes."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(path))
    return _Reader(path, base).daemon(table)


class _Reader:
    """Reads one file's tables; every error names ``path`` and the key."""

    def __init__(self, path: str, base: str) -> None:
        self.path = path
        self.base = base

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {message}")

    def daemon(self, table: Mapping[str, Any]) -> DaemonConfig:
        for key in table:
            if key not in (*NODE_KEYS, "export"):
                known = ", ".join((*NODE_KEYS, "[[export]]"))
                raise self.fail(key, f"unknown setting (the file takes {known})")
        tls, tls_certificates, tls_verify_peer, tls_allowed_subjects = self.tls(table)
        node = NodeConfig(
            addr=self.text(table, "addr") or NodeConfig.addr,
            port=self.port(table),
            sock=self.path_of(table, "sock"),
            metrics=self.metrics(table),
            trace=self.path_of(table, "trace"),
            lockspace=self.lockspace(table),
            exit_stops_node=False,
            hooks=self.hooks(table, "hooks"),
            tls=tls,
            tls_certificates=tls_certificates,
            tls_verify_peer=tls_verify_peer,
            tls_allowed_subjects=tls_allowed_subjects,
            max_clients=self.count(table, "max_clients", NodeConfig.max_clients),
            max_connections_per_address=self.count(
                table, "max_connections_per_address", NodeConfig.max_connections_per_address
            ),
        )
        return DaemonConfig(
            path=self.path,
            node=node,
            exports=self.exports(table.get("export", [])),
            log=self.path_of(table, "log"),
        )

    def exports(self, tables: object) -> tuple[ExportConfig, ...]:
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise self.fail("export", "must be [[export]] tables")
        exports: list[ExportConfig] = []
        seen: dict[str, int] = {}
        for number, table in enumerate(tables, start=1):
            name = table.get("name")
            where = f"[[export]] #{number}" + (f' "{name}"' if isinstance(name, str) else "")
            try:
                export = parse_export(self.with_hook_paths(table))
            except BadExportConfig as error:
                raise self.fail(f"{where}: {error.key}", error.message) from None
            if export.export_name in seen:
                raise self.fail(
                    f"{where}: name", f"also the name of [[export]] #{seen[export.export_name]}"
                )
            seen[export.export_name] = number
            exports.append(replace(export, file=self.resolve(export.file)))
        return tuple(exports)

    # -- values ---------------------------------------------------------------------

    def text(self, table: Mapping[str, Any], key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, not {value!r}")
        return value

    def path_of(self, table: Mapping[str, Any], key: str) -> str | None:
        value = self.text(table, key)
        return None if value is None else self.resolve(value)

    def with_hook_paths(self, table: Mapping[str, Any]) -> Mapping[str, Any]:
        """``table`` with its hooks' relative paths taken from the file's directory."""
        hooks = table.get("hooks")
        if not isinstance(hooks, dict):
            return table
        paths = {k: self.resolve(v) if isinstance(v, str) and v else v for k, v in hooks.items()}
        return {**table, "hooks": paths}

    def hooks(self, table: Mapping[str, Any], where: str) -> HookConfig | None:
        """The daemon's own hooks (each export's come over them), or None."""
        if "hooks" not in table and "hook_timeout" not in table:
            return None
        try:
            return parse_hooks(self.with_hook_paths(table).get("hooks"), table.get("hook_timeout"))
        except ValueError as error:
            key = "hook_timeout" if str(error).startswith("hook_timeout") else where
            raise self.fail(key, str(error)) from None

    def resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(path)))

    def count(self, table: Mapping[str, Any], key: str, default: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, f"must be a whole number, 1 or more, not {value!r}")
        return value

    def port(self, table: Mapping[str, Any]) -> int:
        value = table.get("port", NodeConfig.port)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise self.fail("port", f"must be a port number (0 to 65535), not {value!r}")
        return value

    def metrics(self, table: Mapping[str, Any]) -> tuple[str, int] | None:
        value = self.text(table, "metrics")
        if value is None:
            return None
        host, colon, port = value.rpartition(":")
        if not colon or not host or not port.isdigit() or int(port) > 65535:
            raise self.fail("metrics", f'must be "ADDR:PORT", not {value!r}')
        return host.strip("[]"), int(port)

    def tls(self, table: Mapping[str, Any]) -> tuple[TLSMode, str | None, bool, str | None]:
        """``tls``, ``tls_certificates``, ``tls_verify_peer``, ``tls_allowed_subjects``;
        each needs the others as ``ferry serve``'s options do."""
        value = table.get("tls", TLSMode.OFF.value)
        modes = [mode.value for mode in TLSMode]
        if value not in modes:
            allowed = ", ".join(f'"{mode}"' for mode in modes)
            raise self.fail("tls", f"must be one of {allowed}, not {value!r}")
        mode = TLSMode(value)
        certificates = self.path_of(table, "tls_certificates")
        verify_peer = table.get("tls_verify_peer", False)
        if not isinstance(verify_peer, bool):
            raise self.fail("tls_verify_peer", f"must be true or false, not {verify_peer!r}")
        allowed_subjects = self.path_of(table, "tls_allowed_subjects")
        if mode is not TLSMode.OFF and certificates is None:
            raise self.fail(
                "tls",
                f'"{mode.value}" needs tls_certificates, a directory with ca-cert.pem, '
                "server-cert.pem and server-key.pem",
            )
        if verify_peer and mode is TLSMode.OFF:
            raise self.fail("tls_verify_peer", 'needs tls = "on" or "require"')
        if allowed_subjects is not None and not verify_peer:
            raise self.fail(
                "tls_allowed_subjects",
                "needs tls_verify_peer = true: without it no subject is verified",
            )
        return mode, certificates, verify_peer, allowed_subjects

    def lockspace(self, table: Mapping[str, Any]) -> str | None:
        value = self.text(table, "lockspace")
        if value is None or value == NO_LOCKSPACE:
            return value
        scheme, _, rest = value.partition(":")
        if scheme == "local" and rest.strip():
            value = f"local:{self.resolve(rest.strip())}"
        try:
            parse_lockspace(value)
        except ValueError as error:
            raise self.fail("lockspace", str(error)) from None
        return value
