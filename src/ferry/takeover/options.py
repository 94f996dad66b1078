"""The taker's options against the giver's: what is served, and where, is the giver's.

A takeover moves an export as it is served -- the same file, name,
addresses, ports, control socket, ACL and lease -- so the taker takes
those from the giver (``served``, :data:`SERVED`).  An operator may still
write them out, as on the command line the giver was started with
(``ferry serve ... --takeover SOCK``): each one given must be the giver's,
or the takeover is refused before anything is held, with one line per
difference.  :func:`differences` is that check.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Final

from ferry.handoff.address import AddressError, ServiceAddress
from ferry.lease.spec import parse_lockspace

__all__ = ["SERVED", "differences"]

#: The options a takeover takes from the giver, by ServeConfig's names, with the
#: command line's spelling for the messages.
SERVED: Final = {
    "file": "--file",
    "name": "--name",
    "addr": "--addr",
    "port": "--port",
    "sock": "--sock",
    "acl": "ACL entries",
    "default_deny": "--default-deny",
    "oldstyle": "--oldstyle",
    "read_only": "--read-only",
    "metrics": "--metrics",
    "lockspace": "--lockspace",
    "resource": "--resource",
    "service_address": "--service-address",
}


def differences(given: Mapping[str, Any], served: Mapping[str, Any]) -> list[str]:
    """One line for each option in ``given`` that is not what the giver serves with.

    ``given`` holds only the options the operator wrote (by ServeConfig's
    names); a file is compared by identity (device and inode), addresses
    and lockspaces by what they mean, the ACL as a set.
    """
    lines = []
    for key, value in given.items():
        if key not in SERVED:
            continue
        theirs = served.get(key)
        if not _same(key, value, theirs):
            lines.append(
                f"{SERVED[key]} {_show(key, value)} is not the old process's "
                f"{_show(key, theirs)}: leave it out to take the old process's"
            )
    return lines


def _same(key: str, mine: Any, theirs: Any) -> bool:
    if key == "file":
        return _same_file(mine, theirs)
    if key == "sock":
        return theirs is not None and os.path.realpath(mine) == os.path.realpath(theirs)
    if key == "addr":
        return _same_address(mine, theirs)
    if key == "acl":
        return _networks(mine) == _networks(theirs)
    if key == "metrics":
        if mine is None or theirs is None:
            return mine is None and theirs is None
        return _same_address(mine[0], theirs[0]) and int(mine[1]) == int(theirs[1])
    if key == "lockspace":
        return _lockspace(mine) == _lockspace(theirs)
    if key == "service_address":
        return _service(mine) == _service(theirs)
    return bool(mine == theirs)


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
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
