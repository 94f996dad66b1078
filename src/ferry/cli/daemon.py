"""``ferry daemon``, ``ferry export`` and ``ferry reload``: many exports in one process.

``ferry daemon --config FILE`` runs :mod:`ferry.daemon`; the others speak
to a running node's control socket in JSON lines: ``export add``,
``export remove`` and ``export list`` (``export.add``, ``export.remove``,
``export.list``), and ``reload`` (``config.reload``, what SIGHUP does, but
with an answer).

This module only reads the command line; the work is imported when one of
these modes runs, so every other ``ferry`` mode starts as fast as before.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ferry.cli.errors import UserError

__all__ = ["add_daemon_commands", "json_request"]


def add_daemon_commands(modes: argparse._SubParsersAction[Any]) -> None:
    """Add ``daemon``, ``export`` and ``reload`` to ``ferry``'s modes."""
    daemon = modes.add_parser(
        "daemon", help="serve the exports a TOML file describes, on one port (systemd-ready)"
    )
    daemon.add_argument("-c", "--config", required=True, metavar="FILE", help="the daemon's file")
    daemon.add_argument(
        "--takeover",
        metavar="SOCK",
        help="take every export over from the ferry whose control socket is SOCK, on this "
        "host, with its listening sockets, leases and client connections (an upgrade: "
        "clients see a pause, not a disconnect); the old process exits 0. The exports are "
        "the old process's as it serves them; the file's addr, port, sock, metrics, "
        "lockspace and TLS keys must be its",
    )
    daemon.add_argument("--takeover-format", type=int, action="append", help=argparse.SUPPRESS)
    group = daemon.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    daemon.set_defaults(run=run_daemon)

    export = modes.add_parser("export", help="add, remove or list a running node's exports")
    actions = export.add_subparsers(dest="export_mode", metavar="ACTION", parser_class=type(export))
    add = actions.add_parser("add", help="serve another image on the node's port")
    _sock(add)
    add.add_argument("-n", "--name", required=True, help="the export's name")
    add.add_argument("-f", "--file", required=True, help="the image file (or block device)")
    add.add_argument(
        "--mode", choices=["serve", "listen"], default="serve", help="serve it, or wait for it"
    )
    add.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    add.add_argument(
        "--acl",
        action="append",
        default=[],
        metavar="ENTRY",
        help="an address or CIDR allowed to use the export (repeat for more)",
    )
    add.add_argument("-d", "--default-deny", action="store_true", help="an empty ACL admits no one")
    add.add_argument("--resource", metavar="NAME", help="the lease's name")
    add.add_argument(
        "--max-downtime", type=float, metavar="SECONDS", help="its migrations' default"
    )
    add.set_defaults(run=run_export_add)

    remove = actions.add_parser("remove", help="stop serving an export, its clients drained")
    _sock(remove)
    remove.add_argument("-n", "--name", required=True, help="the export's name")
    remove.add_argument(
        "--force", action="store_true", help="even while it migrates (the migration is broken)"
    )
    remove.set_defaults(run=run_export_remove)

    listing = actions.add_parser("list", help="the node's exports, their states and clients")
    _sock(listing)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(run=run_export_list)

    reload = modes.add_parser("reload", help="make a daemon read its file again (as SIGHUP does)")
    _sock(reload)
    reload.set_defaults(run=run_reload)


def _sock(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--sock", required=True, help="control socket path")


def json_request(sock: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """One JSON-lines request; its result, or a UserError with the server's one line."""
    from ferry.control.client import ControlError, JsonControl

    try:
        with JsonControl(sock) as control:
            answer = control.call(method, params or {})
    except ControlError as error:
        raise UserError(str(error)) from None
    if "error" in answer:
        refusal = answer["error"]
        message = refusal.get("message", refusal) if isinstance(refusal, dict) else refusal
        raise UserError(str(message))
    return answer.get("result")


# -- modes ----------------------------------------------------------------------


def run_daemon(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from ferry.cli.running import run_until_stopped
    from ferry.daemon.config import ConfigError, load_config
    from ferry.daemon.service import Daemon
    from ferry.logs import LogFileError, open_log_file, start_logging

    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise UserError(str(error)) from None
    if args.takeover is not None:
        return _take_over(args, config)
    try:
        log_file = open_log_file(config.log) if config.log else None
    except LogFileError as error:
        raise UserError(str(error)) from None
    start_logging(verbose=args.verbose, quiet=args.quiet, json_file=log_file)
    daemon = Daemon(reactor, config)
    daemon.listen_for_hangup()
    run_until_stopped(reactor, daemon.start(), daemon.shutdown, prefix=f"{args.config}: ")
    return 0


def _take_over(args: argparse.Namespace, config: Any) -> int:
    """``ferry daemon --config FILE --takeover SOCK``: the old node's exports, this file's
    node (which must be the old one's: ``differences``), reloaded from this file later."""
    from twisted.internet import defer, reactor

    from ferry.cli.running import run_until_stopped
    from ferry.cli.takeover import take_over, takeover_described
    from ferry.daemon.service import Daemon
    from ferry.logs import LogFileError, open_log_file, start_logging
    from ferry.node import NodeConfig, StartupError
    from ferry.takeover.options import differences

    path = args.takeover
    served = takeover_described(path)
    node = config.node
    given = {
        "addr": node.addr,
        "port": node.port,
        "sock": node.sock,
        "metrics": node.metrics,
        "lockspace": node.lockspace,
        "tls": node.tls,
        "tls_certificates": node.tls_certificates,
        "tls_verify_peer": node.tls_verify_peer,
        "tls_allowed_subjects": node.tls_allowed_subjects,
    }
    given = {key: value for key, value in given.items() if value is not None}
    wrong = differences(given, served)
    if wrong:
        raise UserError(f"{args.config}: --takeover {path}: " + "; ".join(wrong))
    try:
        taken = NodeConfig.from_served(served, trace=node.trace, exit_stops_node=False)
    except StartupError as error:
        raise UserError(f"--takeover {path}: {error}") from None
    try:
        log_file = open_log_file(config.log) if config.log else None
    except LogFileError as error:
        raise UserError(str(error)) from None
    start_logging(verbose=args.verbose, quiet=args.quiet, json_file=log_file)
    daemon = Daemon(reactor, config, node=taken)
    take_over(daemon.node, path, served, given, args.takeover_format)
    daemon.listen_for_hangup()
    reactor.callWhenRunning(daemon.up)
    run_until_stopped(reactor, defer.succeed(None), daemon.shutdown, prefix=f"{args.config}: ")
    return 0


def run_export_add(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "name": args.name,
        # The daemon's directory is not ours: a relative path means this one.
        "file": os.path.abspath(args.file),
        "mode": args.mode,
        "read_only": args.read_only,
        "acl": args.acl,
        "default_deny": args.default_deny,
    }
    if args.resource is not None:
        params["resource"] = args.resource
    if args.max_downtime is not None:
        params["max_downtime"] = args.max_downtime
    row = json_request(args.sock, "export.add", params)
    print(f"export {row['name']!r} added: {row['state']}")
    return 0


def run_export_remove(args: argparse.Namespace) -> int:
    json_request(args.sock, "export.remove", {"name": args.name, "force": args.force})
    print(f"export {args.name!r} removed")
    return 0


def run_export_list(args: argparse.Namespace) -> int:
    rows = json_request(args.sock, "export.list")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        lease = row.get("lease") or {}
        fields = [
            row["name"],
            f"state={row['state']}",
            f"clients={row['clients']}",
            f"mode={row['mode']}",
            f"migrating={row['migrating'] or 'no'}",
            f"lease={lease.get('state', 'none')}",
            f"file={row['file']}",
        ]
        print(" ".join(fields))
    return 0


def run_reload(args: argparse.Namespace) -> int:
    try:
        result = json_request(args.sock, "config.reload")
    except UserError as error:
        raise UserError(f"reload refused: {error}") from None
    print(result["summary"])
    return 0
