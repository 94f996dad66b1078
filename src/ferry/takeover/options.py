"""The taker's options against the giver's: what is served, and where, is the giver's.

A takeover moves a node as it serves -- its exports with their files,
names, ACLs and leases, and the node's addresses, ports, control socket
and ACL -- so the taker takes those from the giver (its ``served`` answer,
:func:`served_exports` and ``NodeConfig.from_served``).  An operator may
still write them out, as on the command line the giver was started with
(``ferry serve ... --takeover SOCK``) or in a daemon's file: each one
given must be the giver's, or the takeover is refused before anything is
held, with one line per difference.  :func:`differences` is that check.

``served`` is ``{"node": {...}, "exports": [{...}, ...]}``: the node's
options (:data:`NODE_OPTIONS`) and, in the order they were added (the
first is the default export), each export's settings
(:data:`ferry.exports.EXPORT_KEYS` and its ``description``) with the name
its lease is held under (``lease_owner``, None without one).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Final

from ferry.exports import BadExportConfig, ExportConfig, parse_export
from ferry.handoff.address import AddressError, ServiceAddress
from ferry.lease.spec import parse_lockspace

__all__ = ["EXPORT_OPTIONS", "NODE_OPTIONS", "differences", "served_exports"]

#: The node's options a takeover takes from the giver, by NodeConfig's names, with
#: the command line's spelling for the messages.
NODE_OPTIONS: Final = {
    "addr": "--addr",
    "port": "--port",
    "sock": "--sock",
    "acl": "ACL entries",
    "default_deny": "--default-deny",
    "oldstyle": "--oldstyle",
    "metrics": "--metrics",
    "lockspace": "--lockspace",
    "service_address": "--service-address",
    "tls": "--tls",
    "tls_certificates": "--tls-certificates",
    "tls_verify_peer": "--tls-verify-peer",
    "tls_allowed_subjects": "--tls-allowed-subjects",
    "max_clients": "--max-clients",
    "max_connections_per_address": "--max-connections-per-address",
}
#: ``ferry serve``'s options about its one export, by ServeConfig's names.
EXPORT_OPTIONS: Final = {
    "file": "--file",
    "name": "--name",
    "read_only": "--read-only",
    "resource": "--resource",
    "hooks": "--hook",
    "hook_timeout": "--hook-timeout",
}


def differences(given: Mapping[str, Any], served: Mapping[str, Any]) -> list[str]:
    """One line for each option in ``given`` that is not what the giver serves with.

    ``given`` holds only the options the operator wrote (by ServeConfig's
    names): the node's, compared with the giver's node, and ``ferry
    serve``'s about its export, compared with the giver's one export (a
    giver of several is refused by the caller).  A file is compared by
    identity (device and inode), addresses and lockspaces by what they
    mean, the ACL as a set; a port 0 (any free port) is any port.
    """
    node = served.get("node") or {}
    exports = served.get("exports") or []
    export = exports[0] if len(exports) == 1 else {}
    lines = []
    for key, value in given.items():
        if key in NODE_OPTIONS:
            flag, theirs = NODE_OPTIONS[key], node.get(key)
        elif key in EXPORT_OPTIONS:
            flag, theirs = EXPORT_OPTIONS[key], export.get(key)
        else:
            continue
        if not _same(key, value, theirs):
            lines.append(
                f"{flag} {_show(key, value)} is not the old process's "
                f"{_show(key, theirs)}: leave it out to take the old process's"
            )
    return lines


def served_exports(served: Mapping[str, Any]) -> tuple[ExportConfig, ...]:
    """The giver's exports as it serves them now, in its order; ValueError if one cannot be
    read (the giver is not a ferry this one understands)."""
    configs = []
    for entry in served["exports"]:
        if not isinstance(entry, dict):
            raise ValueError(f"an export is {entry!r:.80}, not an object")
        settings = {key: entry.get(key) for key in ("name", "file", "read_only", "acl")}
        settings |= {
            key: entry[key]
            for key in ("default_deny", "resource", "max_downtime", "hooks", "hook_timeout")
        }
        settings["mode"] = "serve"
        settings = {key: value for key, value in settings.items() if value is not None}
        try:
            config = parse_export(settings)
        except BadExportConfig as error:
            raise ValueError(f"export {entry.get('name')!r}: {error}") from None
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"export {config.export_name!r}: description is {description!r:.80}")
        configs.append(dataclasses.replace(config, description=description))
    return tuple(configs)


def _same(key: str, mine: Any, theirs: Any) -> bool:
    if key == "port":
        return bool(mine == 0 or mine == theirs)
    if key == "file":
        return _same_file(mine, theirs)
    if key in ("sock", "tls_certificates", "tls_allowed_subjects"):
        return bool(theirs is not None and os.path.realpath(mine) == os.path.realpath(theirs))
    if key == "tls":
        return bool(str(getattr(mine, "value", mine)) == theirs)
    if key == "hooks":
        return _hooks(mine) == _hooks(theirs)
    if key == "addr":
        return _same_address(mine, theirs)
    if key == "acl":
        return _networks(mine) == _networks(theirs)
    if key == "metrics":
        if mine is None or theirs is None:
            return mine is None and theirs is None
        return _same_address(mine[0], theirs[0]) and int(mine[1]) in (0, int(theirs[1]))
    if key == "lockspace":
        return _lockspace(mine) == _lockspace(theirs)
    if key == "service_address":
        return _service(mine) == _service(theirs)
    return bool(mine == theirs)


def _hooks(table: Any) -> dict[str, str] | None:
    """A hooks table with its paths resolved (None: not a table)."""
    if not isinstance(table, dict):
        return None
    return {str(stage): os.path.realpath(str(path)) for stage, path in table.items()}


def _same_file(mine: Any, theirs: Any) -> bool:
    try:
        a, b = os.stat(mine), os.stat(theirs)
    except (OSError, TypeError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _same_address(mine: Any, theirs: Any) -> bool:
    try:
        return ipaddress.ip_address(mine) == ipaddress.ip_address(theirs)
    except ValueError:
        return bool(mine == theirs)


def _networks(entries: Any) -> set[Any]:
    try:
        return {ipaddress.ip_network(entry, strict=False) for entry in entries or ()}
    except (TypeError, ValueError):
        return {str(entry) for entry in entries or ()}


def _lockspace(text: Any) -> str:
    if text in (None, "none"):
        return str(text)
    try:
        return str(parse_lockspace(text))
    except (TypeError, ValueError):
        return str(text)


def _service(text: Any) -> str | None:
    if text is None:
        return None
    try:
        return str(ServiceAddress.parse(text))
    except (AddressError, TypeError):
        return str(text)


def _show(key: str, value: Any) -> str:
    if value is None:
        return "(none)"
    if key == "acl":
        return " ".join(value) or "(empty)"
    if key == "metrics":
        return f"{value[0]}:{value[1]}"
    if key == "hooks":
        return " ".join(f"{stage}={path}" for stage, path in value.items()) or "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
