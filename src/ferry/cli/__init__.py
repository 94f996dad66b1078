"""The ``ferry`` command.

Modes and options follow flexnbd's (``serve --addr --port --file --sock
--default-deny``, ``read --from --size``, ...) so its operators and scripts
carry over.  Every user error ends in one line on stderr and a non-zero
exit status, never a traceback: exit 1 for a problem with the world (a
missing file, a port in use), 2 for a problem with the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ferry import __version__
from ferry.cli.daemon import add_daemon_commands, json_request
from ferry.cli.drain import add_drain_command
from ferry.cli.errors import UserError
from ferry.cli.lock import add_lock_commands
from ferry.migrate.options import CopyMode
from ferry.serve.limits import MAX_CLIENTS, MAX_CONNECTIONS_PER_ADDRESS

SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_count(text: str) -> int:
    """``4096``, ``64k``, ``1M``, ``2G``: binary multiples."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return int(match.group(1)) * SIZE_SUFFIXES[match.group(2).lower()]


def positive_count(text: str) -> int:
    """A count of something there must be at least one of (connections, exports)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {count}")
    return count


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _lockspace_text(text: str) -> str:
    """``--lockspace``: checked here, so a bad one is a usage error (exit 2); kept as text."""
    from ferry.lease.spec import parse_lockspace

    if text == "none":
        return text
    try:
        parse_lockspace(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _service_address_text(text: str) -> str:
    """``--service-address``: checked here, so a bad one is a usage error (exit 2)."""
    from ferry.handoff.address import AddressError, ServiceAddress

    try:
        ServiceAddress.parse(text)
    except AddressError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _hook_text(text: str) -> tuple[str, str]:
    """``--hook STAGE=PATH``: the stage known and PATH an executable (else exit 2)."""
    from ferry.hooks import parse_hooks

    stage, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected STAGE=PATH, got {text!r}")
    path = os.path.abspath(path) if path else path
    try:
        parse_hooks({stage: path})
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return stage, path


def host_and_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return host.strip("[]"), port_number(port)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        mode = self.prog.split()[-1]
        prefix = "ferry" if mode == "ferry" else f"ferry {mode}"
        self.exit(2, f"{prefix}: {message}\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="ferry",
        description="Serve a disk image over NBD and move it live to another host.",
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    modes = parser.add_subparsers(dest="mode", metavar="MODE", parser_class=Parser)
    version = modes.add_parser("version", help="print ferry's version")
    version.set_defaults(run=lambda args: print(f"ferry {__version__}") or 0)

    for name, helptext in (
        ("serve", "serve an image file over NBD"),
        ("listen", "wait for a migration of an image, then serve it on the same port"),
    ):
        serve = modes.add_parser(name, help=helptext)
        # serve --takeover takes these from the old process: not required there.
        _network(serve, required=name == "listen")
        serve.add_argument(
            "-f", "--file", required=name == "listen", help="the image file (or block device)"
        )
        _control_sock(serve, required=False)
        serve.add_argument(
            "-d",
            "--default-deny",
            action="store_true",
            default=None,
            help="an empty ACL admits no one (without it, an empty ACL admits everyone)",
        )
        serve.add_argument(
            "--oldstyle",
            action="store_true",
            default=None,
            help="speak the oldstyle handshake"
            + (" (a migration from flexnbd mirror)" if name == "listen" else ""),
        )
        if name == "serve":
            serve.add_argument(
                "-r", "--read-only", action="store_true", default=None, help="refuse writes (EPERM)"
            )
            serve.add_argument(
                "--takeover",
                metavar="SOCK",
                help="take the export over from the ferry whose control socket is SOCK, on this "
                "host, with its listening sockets, lease and every client connection (an "
                "upgrade: clients see a pause, not a disconnect); the old process exits 0. "
                "What is served and where comes from the old process: an option given too "
                "must match it",
            )
            serve.add_argument(
                # A test hook: the takeover state formats this process reads, as a ferry
                # of another version would; the old one's offer in any other is refused.
                "--takeover-format",
                type=int,
                action="append",
                help=argparse.SUPPRESS,
            )
        serve.add_argument(
            "-n", "--name", default=None, help="export name (default: the file's name)"
        )
        serve.add_argument(
            "--metrics", type=host_and_port, metavar="ADDR:PORT", help="serve Prometheus /metrics"
        )
        serve.add_argument("--trace", metavar="FILE", help="append every state transition as JSON")
        serve.add_argument(
            "--log",
            metavar="FILE",
            help="also append every log event, debug up, as JSON lines (with the export and, "
            "for transitions, the trace's fields)",
        )
        serve.add_argument(
            "--lockspace",
            type=_lockspace_text,
            metavar="SPEC",
            help="where the image's lease is held while serving (listen: taken over with the "
            "migration): local:DIR or etcd:http[s]://HOST:PORT[,HOST:PORT...][?cacert=FILE&"
            "cert=FILE&key=FILE&user=NAME&password-file=FILE], or none; "
            "default: a local directory (/var/lib/ferry/locks for root); lose it and I/O stops",
        )
        serve.add_argument(
            "--resource",
            metavar="NAME",
            help="the lease's name (default: the image's real path; listen: the one "
            "the migration's source holds)",
        )
        serve.add_argument(
            "--service-address",
            type=_service_address_text,
            metavar="IP/PREFIX@DEV",
            help=(
                "the address clients use, which moves with the image: added to DEV if "
                "missing and listened on (with --port) besides --addr"
                if name == "serve"
                else "the address this node takes over at the commit: added to DEV once "
                "the source has dropped it, announced (gratuitous ARP), listened on from now"
            ),
        )
        serve.add_argument(
            "--hook",
            action="append",
            default=[],
            type=_hook_text,
            metavar="STAGE=PATH",
            help="run the executable PATH at STAGE (pre-migrate, pre-switchover, post-handoff, "
            "post-takeover, lease-lost, fenced); a non-zero exit at pre-migrate or "
            "pre-switchover cancels the migration (repeatable)",
        )
        serve.add_argument(
            "--hook-timeout",
            type=float,
            metavar="SECONDS",
            help="kill a hook that runs longer (default 30); at a vetoing stage that is a veto",
        )
        serve.add_argument(
            "--max-clients",
            type=positive_count,
            metavar="N",
            help=f"NBD connections at once (default {MAX_CLIENTS}); when full, the longest "
            "idle connection of the address holding the most makes room",
        )
        serve.add_argument(
            "--max-connections-per-address",
            type=positive_count,
            metavar="N",
            help=f"NBD connections from one address (default {MAX_CONNECTIONS_PER_ADDRESS}); "
            "the next is refused in its handshake",
        )
        _tls_server(serve, listen=name == "listen")
        serve.add_argument(
            "--nbd-sock",
            metavar="PATH",
            help="also serve NBD on this Unix socket (mode 0600; the ACL does not apply to it)"
            + ("; a source mirrors to it with unix:PATH" if name == "listen" else ""),
        )
        if name == "listen":
            serve.add_argument(
                "--stdio",
                action="store_true",
                help="take the migration on stdin and stdout (a source's exec:COMMAND; "
                "whoever starts this is trusted as the sender), then serve on --addr/--port; "
                "exit 1 if stdin closes before the image is received",
            )
        _verbosity(serve)
        serve.add_argument("acl", nargs="*", metavar="ACL_ENTRY", help="address or CIDR allowed in")
        serve.set_defaults(run=run_serve, listen=name == "listen", usage_error=serve.error)

    mirror = modes.add_parser(
        "mirror", help="migrate a running server's image to a listener (or any NBD server)"
    )
    _network(mirror, required=False)
    mirror.add_argument(
        "--to",
        metavar="URI",
        help="the destination instead of --addr/--port: tcp:HOST:PORT, unix:PATH (a listener's "
        "--nbd-sock) or exec:COMMAND (the stream over the command's stdin and stdout, "
        "e.g. exec:'ssh HOST ferry listen --stdio ...')",
    )
    _control_sock(mirror, required=True)
    mirror.add_argument("-b", "--bind", help="local address to connect from")
    mirror.add_argument(
        "-m", "--max-bps", type=byte_count, default=0, help="bandwidth limit, bytes per second"
    )
    mirror.add_argument(
        "--max-downtime",
        type=float,
        default=None,
        metavar="SECONDS",
        help="switch over when the rest can be sent in this long (default 0.3)",
    )
    mirror.add_argument(
        "--max-passes",
        type=int,
        default=None,
        help="passes before client writes are throttled (default 30)",
    )
    mirror.add_argument(
        "--max-retries",
        type=int,
        default=None,
        metavar="N",
        help="give up after N lost attempts (default: retry for ever)",
    )
    mirror.add_argument(
        "--retry-for",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up once attempts have been lost for this long",
    )
    mirror.add_argument(
        "--action",
        choices=["exit", "unlink", "nothing"],
        default=None,
        help="what the source does after the handoff (default exit)",
    )
    mirror.add_argument("-u", "--unlink", action="store_true", help="same as --action unlink")
    mirror.add_argument(
        "--flexnbd",
        action="store_true",
        help="the destination is a flexnbd listener: send flexnbd's stream, DISC hands over",
    )
    mirror.add_argument(
        "--copy-mode",
        choices=[mode.value for mode in CopyMode],
        default=None,
        help="background (the default): client writes mark the image dirty for a later "
        "pass; write-blocking: a write to what is already copied is answered once the "
        "destination has it too, so the migration converges under any write rate",
    )
    mirror.add_argument(
        "-w", "--wait", action="store_true", help="show progress until the end; exit 0 on success"
    )
    _export(mirror)
    mirror.add_argument(
        "--dest-export",
        metavar="NAME",
        help="the destination's export to migrate into (default: the same name as --export, "
        "or the destination's default export)",
    )
    mirror.set_defaults(run=run_mirror)

    proxy = modes.add_parser(
        "proxy",
        help="a local NBD endpoint that follows the image across migrations and restarts",
        description="Serve NBD clients on --addr/--port (or --sock) and pass their requests, "
        "as many in flight as they send, to the server at --conn-addr/--conn-port, one server "
        "connection per client.  When the server goes away the requests wait, the proxy "
        "reconnects (following a ferry source that says where the image went), and every "
        "request without an answer is sent again; after --max-wait they get EIO.",
    )
    proxy.add_argument("-l", "--addr", help="IP address to serve clients on (with --port)")
    proxy.add_argument("-p", "--port", type=port_number, help="TCP port to serve clients on")
    proxy.add_argument("-s", "--sock", help="Unix socket to serve clients on, instead")
    proxy.add_argument("-C", "--conn-addr", required=True, help="the server's address or name")
    proxy.add_argument(
        "-P", "--conn-port", type=port_number, required=True, help="the server's port"
    )
    proxy.add_argument("-b", "--bind", help="local address to connect to the server from")
    proxy.add_argument(
        "-n", "--name", default="", help="the export to ask the server for (default: its default)"
    )
    proxy.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long requests wait for a lost server before they get EIO (default 60)",
    )
    proxy.add_argument(
        "--metrics", type=host_and_port, metavar="ADDR:PORT", help="serve Prometheus /metrics"
    )
    proxy.add_argument(
        "--lockspace",
        metavar="SPEC",
        help="find the image where its lease holder serves it (etcd:http://HOST:PORT[,...]), "
        "then at --conn-addr",
    )
    proxy.add_argument("--resource", metavar="NAME", help="the image's lease (with --lockspace)")
    proxy.add_argument("--control-sock", metavar="PATH", help="control socket (status)")
    proxy.add_argument("--trace", metavar="FILE", help="append every state transition as JSON")
    proxy.add_argument("--log", metavar="FILE", help="also append every log event as JSON lines")
    _verbosity(proxy)
    proxy.set_defaults(run=lambda args: run_proxy(proxy, args))

    breaker = modes.add_parser("break", help="stop a running migration; the source keeps serving")
    _control_sock(breaker, required=True)
    _export(breaker)
    breaker.set_defaults(run=lambda args: run_simple(args, ["break"]))

    block = modes.add_parser(
        "block", help="refuse to migrate an export until unblocked, and say why"
    )
    _control_sock(block, required=True)
    _export(block)
    block.add_argument("reason", nargs="+", metavar="REASON", help="why (words are joined)")
    block.set_defaults(run=run_block)

    unblock = modes.add_parser("unblock", help="remove a blocker (without REASON: every one)")
    _control_sock(unblock, required=True)
    _export(unblock)
    unblock.add_argument("reason", nargs="*", metavar="REASON", help="the blocker's reason")
    unblock.set_defaults(run=run_block)

    max_bps = modes.add_parser(
        "mirror-max-bps", help="change a running migration's bandwidth limit"
    )
    _control_sock(max_bps, required=True)
    _export(max_bps)
    max_bps.add_argument("bps", metavar="N", help="bytes per second (0: no limit)")
    max_bps.set_defaults(run=lambda args: run_simple(args, ["mirror_max_bps", args.bps]))

    status = modes.add_parser("status", help="print a server's status line")
    _control_sock(status, required=True)
    _export(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if the server (or the export) is not up yet, keep trying this long (for scripts)",
    )
    status.set_defaults(run=run_status)

    events = modes.add_parser(
        "events", help="print every state transition of a server as it happens, until Ctrl-C"
    )
    _control_sock(events, required=True)
    events.add_argument(
        "--no-current",
        dest="current",
        action="store_false",
        help="do not print first the last record of every machine (where each stands now)",
    )
    _export(events)
    events.set_defaults(run=run_events)

    acl = modes.add_parser("acl", help="replace a server's access control list")
    _control_sock(acl, required=True)
    _export(acl)
    acl.add_argument("acl", nargs="*", metavar="ACL_ENTRY")
    acl.set_defaults(run=run_acl)

    for name, helptext in (
        ("read", "read bytes from an NBD server to stdout"),
        ("write", "write bytes from stdin to an NBD server"),
    ):
        mode = modes.add_parser(name, help=helptext)
        _network(mode, required=True)
        mode.add_argument("-F", "--from", dest="offset", type=byte_count, required=True)
        mode.add_argument("-S", "--size", type=byte_count, required=True)
        mode.add_argument("-b", "--bind", help="local address to connect from")
        mode.add_argument("-n", "--name", default="", help="export name (default export if empty)")
        _tls_certificates(mode, "connect with TLS, verifying the server against DIR's CA")
        mode.set_defaults(run=run_read if name == "read" else run_write)

    trace = modes.add_parser("trace", help="work with transition traces")
    trace_modes = trace.add_subparsers(dest="trace_mode", metavar="ACTION", parser_class=Parser)
    replay = trace_modes.add_parser("replay", help="check a trace against the statecharts")
    replay.add_argument("file")
    replay.set_defaults(run=run_trace_replay)
    show = trace_modes.add_parser(
        "show", help="print the timeline of every machine in one or more traces; draw it as SVG"
    )
    show.add_argument("files", nargs="+", metavar="FILE")
    show.add_argument("--svg", metavar="OUT", help="also draw the timeline into this SVG file")
    show.set_defaults(run=run_trace_show)

    check = modes.add_parser(
        "check", help="say, one line each, which capabilities ferry needs this host has"
    )
    check.add_argument("--file", metavar="PATH", help="also check the image and its file system")
    check.add_argument(
        "--lockspace",
        type=_lockspace_text,
        metavar="SPEC",
        help="also check that this lockspace is reachable and takes a lease",
    )
    check.add_argument(
        "--move-connections",
        action="store_true",
        help="client connections must move at a handoff (TCP_REPAIR, nftables are needed)",
    )
    check.set_defaults(run=run_check)

    add_lock_commands(modes)
    add_daemon_commands(modes)
    add_drain_command(modes)

    charts = modes.add_parser("statecharts", help="work with the statechart files")
    chart_modes = charts.add_subparsers(dest="chart_mode", metavar="ACTION", parser_class=Parser)
    render = chart_modes.add_parser("render", help="write .dot and .mmd beside each YAML")
    render.add_argument("--dir", type=Path, help="directory of the YAML files")
    render.add_argument(
        "--check", action="store_true", help="write nothing; fail if a diagram is stale"
    )
    render.set_defaults(run=run_render)

    helper = modes.add_parser("help", help="show help for a mode")
    helper.add_argument("topic", nargs="?", metavar="MODE")
    helper.set_defaults(run=lambda args: run_help(parser, modes.choices, args))
    return parser


def _network(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("-l", "--addr", required=required, help="IP address")
    parser.add_argument("-p", "--port", type=port_number, required=required, help="TCP port")


def _control_sock(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("-s", "--sock", required=required, help="control socket path")


def _tls_server(parser: argparse.ArgumentParser, *, listen: bool) -> None:
    parser.add_argument(
        "--tls",
        choices=["off", "on", "require"],
        default=None,  # off; None: not given (serve --takeover takes the old process's)
        help="TLS for NBD clients: off (default), on (a client may upgrade with STARTTLS), "
        "require (every client must)",
    )
    _tls_certificates(
        parser,
        "the certificate directory: ca-cert.pem, server-cert.pem, server-key.pem (and "
        "client-cert.pem, client-key.pem: migrations from this node use TLS with them)",
    )
    parser.add_argument(
        "--tls-verify-peer",
        action="store_true",
        default=None,
        help="require a client certificate issued by the directory's CA",
    )
    if listen:
        parser.add_argument(
            "--tls-allowed-subjects",
            metavar="FILE",
            help="the certificate subjects that may send a migration, one RFC 4514 name a "
            "line (needs --tls-verify-peer)",
        )


def _tls_certificates(parser: argparse.ArgumentParser, helptext: str) -> None:
    parser.add_argument("--tls-certificates", metavar="DIR", help=helptext)


def _export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-e", "--export", metavar="NAME", help="which export of a daemon (default: its first)"
    )


def _verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


# -- modes ----------------------------------------------------------------------


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``serve`` the operator wrote, by ServeConfig's names (for --takeover)."""
    given = {
        "file": args.file,
        "name": args.name,
        "addr": args.addr,
        "port": args.port,
        "sock": args.sock,
        "default_deny": args.default_deny,
        "oldstyle": args.oldstyle,
        "read_only": getattr(args, "read_only", None),
        "metrics": args.metrics,
        "lockspace": getattr(args, "lockspace", None),
        "resource": getattr(args, "resource", None),
        "service_address": args.service_address,
        "acl": list(args.acl) or None,
        "tls": args.tls,
        "tls_certificates": args.tls_certificates,
        "tls_verify_peer": args.tls_verify_peer,
        "tls_allowed_subjects": getattr(args, "tls_allowed_subjects", None),
        "hooks": dict(args.hook) or None,
        "hook_timeout": args.hook_timeout,
        "max_clients": args.max_clients,
        "max_connections_per_address": args.max_connections_per_address,
    }
    return {key: value for key, value in given.items() if value is not None}


def run_serve(args: argparse.Namespace) -> int:
    from twisted.internet import defer, reactor

    from ferry.cli.running import run_until_stopped
    from ferry.cli.takeover import take_over, takeover_described
    from ferry.logs import LogFileError, open_log_file, start_logging
    from ferry.node import Node, ServeConfig
    from ferry.tls import TLSMode

    served: dict[str, Any] = {}
    takeover = getattr(args, "takeover", None)
    if takeover is None:
        required = (("-l/--addr", args.addr), ("-p/--port", args.port), ("-f/--file", args.file))
        missing = [flag for flag, value in required if value is None]
        if missing:
            args.usage_error(f"the following arguments are required: {', '.join(missing)}")
        config = ServeConfig(
            file=args.file,
            addr=args.addr,
            port=args.port,
            name=args.name or "",
            sock=args.sock,
            acl=tuple(args.acl),
            default_deny=bool(args.default_deny),
            oldstyle=bool(args.oldstyle),
            read_only=bool(getattr(args, "read_only", False)),
            metrics=args.metrics,
            trace=args.trace,
            listen=args.listen,
            lockspace=getattr(args, "lockspace", None),
            resource=getattr(args, "resource", None),
            tls=TLSMode(args.tls or "off"),
            tls_certificates=args.tls_certificates,
            tls_verify_peer=bool(args.tls_verify_peer),
            tls_allowed_subjects=getattr(args, "tls_allowed_subjects", None),
            service_address=args.service_address,
            hooks=_hooks(args),
            nbd_sock=args.nbd_sock,
            stdio=bool(getattr(args, "stdio", False)),
            max_clients=args.max_clients or MAX_CLIENTS,
            max_connections_per_address=(
                args.max_connections_per_address or MAX_CONNECTIONS_PER_ADDRESS
            ),
        )
        node_config, exports = config.node(), (config.export(),)
    else:
        served = takeover_described(takeover)
        node_config, exports = _serve_takeover_config(args, takeover, served)
    try:
        log_file = open_log_file(args.log) if args.log else None
    except LogFileError as error:
        raise UserError(str(error)) from None
    start_logging(
        verbose=args.verbose,
        quiet=args.quiet,
        json_file=log_file,
        fields={"export": exports[0].export_name},
    )
    if takeover is None:
        node = Node(reactor, node_config, exports)
        run_until_stopped(reactor, node.start(), node.shutdown)
        if node.stdio_failure is not None:
            raise UserError(node.stdio_failure)
        return 0
    node = Node(reactor, node_config)
    take_over(node, takeover, served, _given(args), args.takeover_format)
    run_until_stopped(reactor, defer.succeed(None), node.shutdown)
    return 0


def _hooks(args: argparse.Namespace) -> Any:
    """``--hook`` and ``--hook-timeout`` as a HookConfig (checked: a usage error exits 2)."""
    from ferry.hooks import parse_hooks

    stages = [stage for stage, _ in args.hook]
    twice = sorted({stage for stage in stages if stages.count(stage) > 1})
    if twice:
        _usage(args, f"--hook: {twice[0]} given more than once")
    try:
        return parse_hooks(dict(args.hook), args.hook_timeout)
    except ValueError as error:
        _usage(args, str(error).replace("hook_timeout", "--hook-timeout"))


def _usage(args: argparse.Namespace, message: str) -> NoReturn:
    """A problem with the command line found after parsing: one line, exit 2."""
    print(f"ferry {args.mode}: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_proxy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``ferry proxy``; what argparse cannot check is a usage error all the same (exit 2)."""
    from twisted.internet import reactor

    from ferry.logs import LogFileError, open_log_file, start_logging
    from ferry.proxy.runner import ProxyConfig, ProxyNode, StartupError

    if args.sock is not None and (args.addr is not None or args.port is not None):
        parser.error("listen on --addr and --port, or on --sock, not both")
    if args.sock is None and (args.addr is None or args.port is None):
        parser.error("--addr and --port (or --sock) are required")
    try:
        config = ProxyConfig(
            conn_addr=args.conn_addr,
            conn_port=args.conn_port,
            addr=args.addr,
            port=args.port,
            sock=args.sock,
            bind=args.bind,
            name=args.name,
            max_wait=args.max_wait,
            metrics=args.metrics,
            control_sock=args.control_sock,
            trace=args.trace,
            lockspace=args.lockspace,
            resource=args.resource,
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        log_file = open_log_file(args.log) if args.log else None
    except LogFileError as error:
        raise UserError(str(error)) from None
    start_logging(
        verbose=args.verbose, quiet=args.quiet, json_file=log_file, fields={"export": args.name}
    )
    try:
        node = ProxyNode(reactor, config)
        node.start()
    except StartupError as error:
        raise UserError(str(error)) from None
    reactor.addSystemEventTrigger("before", "shutdown", node.shutdown)
    reactor.run()
    return 0


def _serve_takeover_config(
    args: argparse.Namespace, path: str, served: dict[str, Any]
) -> tuple[Any, tuple[Any, ...]]:
    """``serve --takeover``: the node and the one export the old process serves, checked
    against what was given."""
    from ferry.node import NodeConfig, StartupError
    from ferry.takeover.options import differences, served_exports

    exports = served.get("exports")
    if not isinstance(exports, list) or len(exports) != 1:
        count = len(exports) if isinstance(exports, list) else "no"
        raise UserError(
            f"--takeover {path}: the old process serves {count} exports: take a daemon over "
            f"with ferry daemon --config FILE --takeover {path}"
        )
    wrong = differences(_given(args), served)
    if wrong:
        raise UserError(f"--takeover {path}: " + "; ".join(wrong))
    try:
        node = NodeConfig.from_served(served, trace=args.trace, exit_stops_node=True)
        return node, served_exports(served)
    except (StartupError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--takeover {path}: the old process's options: {error}") from None


def control_request(path: str, lines: Sequence[str]) -> tuple[int, str]:
    """Send one flexnbd-form command; a failure to reach the server is a UserError."""
    from ferry.control.client import ControlError, line_command

    try:
        return line_command(path, list(lines))
    except ControlError as error:
        raise UserError(str(error)) from None


def run_status(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status, text = _status(args)
        except UserError:
            if time.monotonic() >= deadline:
                raise
        else:
            # An export not there yet (its lease still being taken: a local
            # lockspace answers from its own thread) is a server still starting.
            if status == 0 or time.monotonic() >= deadline:
                break
        time.sleep(0.05)  # polling a server that is still starting
    if status != 0:
        raise UserError(text)
    if args.json:
        # Asked again, as JSON: numbers as numbers, booleans as booleans.
        params = None if args.export is None else {"export": args.export}
        print(json.dumps(json_request(args.sock, "status", params), indent=2))
    else:
        print(text)
    return 0


def _status(args: argparse.Namespace) -> tuple[int, str]:
    """The status line: flexnbd's form, or JSON for one export of a daemon."""
    if args.export is None:
        return control_request(args.sock, ["status"])
    from ferry.status import render_value

    fields = json_request(args.sock, "status", {"export": args.export})
    line = " ".join(f"{k}={render_value(v)}" for k, v in fields.items() if k != "export")
    return 0, line


def run_acl(args: argparse.Namespace) -> int:
    if args.export is not None:
        json_request(args.sock, "acl", {"args": args.acl, "export": args.export})
        return 0
    status, text = control_request(args.sock, ["acl", *args.acl])
    if status != 0:
        raise UserError(text)
    return 0


def run_simple(args: argparse.Namespace, lines: list[str]) -> int:
    """A control command whose answer is printed as it comes (``break``, ...).

    With ``--export``, the same command in JSON, about that export.  A
    refusal is an error like any other: one line on stderr, exit 1.
    """
    if args.export is None:
        status, text = control_request(args.sock, lines)
        if status != 0:
            raise UserError(text)
        print(text)
        return 0
    print(json_request(args.sock, lines[0], {"args": lines[1:], "export": args.export}))
    return 0


def run_block(args: argparse.Namespace) -> int:
    """``ferry block`` / ``ferry unblock``: one line saying what blocks the export now."""
    params: dict[str, Any] = {}
    if args.reason:
        params["reason"] = " ".join(args.reason)
    if args.export is not None:
        params["export"] = args.export
    result = json_request(args.sock, args.mode, params)
    blockers = result.get("blockers", [])
    if args.mode == "unblock":
        removed = result.get("removed", [])
        print(f"unblocked: {'; '.join(removed)}" if removed else "nothing was blocked")
    print(f"blocked: {'; '.join(blockers)}" if blockers else "not blocked")
    return 0


def run_mirror(args: argparse.Namespace) -> int:
    from ferry.control.client import ControlError

    try:
        return _mirror(args)
    except ControlError as error:
        raise UserError(str(error)) from None


def _mirror(args: argparse.Namespace) -> int:
    from ferry.control.client import JsonControl

    action = "unlink" if args.unlink else (args.action or "exit")
    target = _mirror_destination(args)
    params: dict[str, Any] = {"args": [*target, action, args.bind or "", str(args.max_bps)]}
    if args.max_downtime is not None:
        params["max_downtime"] = args.max_downtime
    if args.max_passes is not None:
        params["max_passes"] = args.max_passes
    if args.max_retries is not None:
        params["max_retries"] = args.max_retries
    if args.retry_for is not None:
        params["retry_for"] = args.retry_for
    if args.flexnbd:
        params["flexnbd"] = True
    if args.copy_mode is not None:
        params["copy_mode"] = args.copy_mode
    if args.export is not None:
        params["export"] = args.export
    if args.dest_export is not None:
        params["dest_export"] = args.dest_export
    with JsonControl(args.sock) as control:
        answer = control.call("mirror", params)
        if "error" in answer:
            raise UserError(answer["error"]["message"])
        print(answer["result"]["message"], flush=True)
        if not args.wait:
            return 0
        result = control.follow(lambda line: print(line, flush=True), export=args.export)
    if result is None:
        raise UserError("lost contact with the source before the migration ended")
    state = result.get("state")
    if state == "completed":
        where = args.to or f"{args.addr}:{args.port}"
        if result.get("handed_off"):
            print(f"migration completed: {where} has control of the image")
        else:
            print(f"mirror completed: {where} holds a flushed copy")
        return 0
    raise UserError(f"migration ended {state}: {result.get('reason') or 'no reason given'}")


def _mirror_destination(args: argparse.Namespace) -> list[str]:
    """``mirror``'s first arguments: ``IP PORT``, or ``--to``'s URI (checked: a usage error)."""
    from ferry.migrate.options import parse_destination

    if args.to is None:
        if args.addr is None or args.port is None:
            _usage(args, "--addr and --port (or --to URI) are required")
        return [args.addr, str(args.port)]
    if args.addr is not None or args.port is not None:
        _usage(args, "--to or --addr/--port, not both")
    try:
        destination = parse_destination(args.to)
    except ValueError as error:
        _usage(args, f"--to: {error}")
    if args.bind and destination.transport != "tcp":
        _usage(args, f"--bind is for TCP, not {destination.transport}:")
    return [args.to]


def run_read(args: argparse.Namespace) -> int:
    from ferry.remote import RemoteExport

    out = sys.stdout.buffer
    with _remote(args, RemoteExport) as remote:
        _check_range(args, remote.size)
        for offset, length in _chunks(args.offset, args.size):
            out.write(remote.pread(offset, length))
    out.flush()
    return 0


def run_write(args: argparse.Namespace) -> int:
    from ferry.remote import RemoteExport

    source = sys.stdin.buffer
    with _remote(args, RemoteExport) as remote:
        _check_range(args, remote.size)
        for offset, length in _chunks(args.offset, args.size):
            data = source.read(length)
            if len(data) != length:
                got = offset - args.offset + len(data)
                raise UserError(f"stdin ended after {got} of {args.size} bytes")
            remote.pwrite(data, offset)
        remote.flush()
    return 0


def _remote(args: argparse.Namespace, remote_type: Any) -> Any:
    from ferry.remote import NegotiationError, RemoteError
    from ferry.tls import TLSError, load_credentials

    tls = None
    if args.tls_certificates is not None:
        try:
            tls = load_credentials(args.tls_certificates, server=False).client_context()
        except TLSError as error:
            raise UserError(str(error)) from None
    try:
        return _Guarded(
            remote_type.connect(
                args.addr, args.port, export_name=args.name, bind=args.bind, tls=tls
            ),
            (RemoteError, NegotiationError),
        )
    except NegotiationError as error:
        raise UserError(f"{args.addr}:{args.port}: {error}") from None
    except OSError as error:
        raise UserError(f"{args.addr}:{args.port}: {error.strerror or error}") from None


class _Guarded:
    """Context manager that turns the remote's errors into one-line user errors."""

    def __init__(self, remote: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._remote = remote
        self._errors = errors

    def __enter__(self) -> Any:
        return self._remote

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        with contextlib.suppress(Exception):
            self._remote.close()
        if error is not None and isinstance(error, (*self._errors, OSError)):
            raise UserError(str(error)) from None


CHUNK = 4 << 20


def _chunks(start: int, size: int) -> list[tuple[int, int]]:
    return [
        (offset, min(CHUNK, start + size - offset)) for offset in range(start, start + size, CHUNK)
    ]


def _check_range(args: argparse.Namespace, size: int) -> None:
    if args.offset + args.size > size:
        raise UserError(
            f"range {args.offset}+{args.size} is past the end of the export ({size} bytes)"
        )


def run_check(args: argparse.Namespace) -> int:
    """``ferry check``: one line per capability; exit 0 when every needed one is there."""
    import tempfile

    from ferry.check import file_probes, host_probes, lockspace_dir, lockspace_probe, render

    spec = args.lockspace
    local = lockspace_dir(spec)
    ofd_dir = local or (os.path.dirname(os.path.abspath(args.file)) if args.file else None)
    probes = host_probes(
        move_connections=args.move_connections,
        ofd_dir=ofd_dir if ofd_dir and os.path.isdir(ofd_dir) else tempfile.gettempdir(),
        ofd_needed=local is not None,
    )
    if args.file:
        probes += file_probes(args.file)
    if spec is not None and spec != "none":
        from twisted.internet import reactor

        from ferry.cli.lock import settle

        probes.append(lockspace_probe(spec, reactor, settle))
    lines, status = render(probes)
    for line in lines:
        print(line)
    return status


def run_trace_replay(args: argparse.Namespace) -> int:
    from ferry import statecharts
    from ferry.replay import replay
    from ferry.trace import ReplayError

    try:
        with open(args.file, encoding="utf-8") as lines:
            result = replay(lines, statecharts.load_all())
    except OSError as error:
        raise UserError(f"trace {args.file}: {error.strerror}") from None
    except ReplayError as error:
        raise UserError(f"{args.file}: {error}") from None
    for (machine, instance), state in sorted(result.final_states.items()):
        print(f"{machine} {instance} {state}")
    return 0


def run_events(args: argparse.Namespace) -> int:
    """Print the server's transitions as trace lines until it ends the stream or we are stopped.

    Exit 0 when interrupted (SIGINT, SIGTERM: the usual way to stop it) or
    when the server shut down after sending everything; 1 when the server
    dropped us, went away without a word, or could not be reached.
    """
    import signal

    from ferry.control.client import ControlError, JsonControl
    from ferry.trace import TraceFormatError, TraceRecord

    def show(fields: Mapping[str, Any]) -> None:
        try:
            rec = TraceRecord(**fields)
        except (TraceFormatError, TypeError) as error:
            raise ControlError(f"control socket {args.sock}: not a trace record: {error}") from None
        print(rec.to_json(), flush=True)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: one started in the background by a shell without job
    # control inherits it ignored, and Python then leaves it so.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        with JsonControl(args.sock) as control:
            for fields in control.subscribe(current=args.current, export=args.export):
                show(fields)
            print(f"ferry events: following {args.sock}", file=sys.stderr, flush=True)
            end = control.follow_events(show)
    except ControlError as error:
        raise UserError(str(error)) from None
    except KeyboardInterrupt:
        print("ferry events: stopped", file=sys.stderr)
        return 0
    if end is None:
        raise UserError(f"control socket {args.sock}: the server went away")
    if not end.complete:
        raise UserError(f"control socket {args.sock}: {end.reason}")
    print(f"ferry events: {args.sock}: {end.reason}", file=sys.stderr)
    return 0


def run_trace_show(args: argparse.Namespace) -> int:
    from ferry.timeline import build_timeline, render_svg, render_text
    from ferry.trace import ReplayError, TraceRecord, read_records

    traces: list[tuple[str, list[TraceRecord]]] = []
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as lines:
                records = [rec for _, _, rec in read_records(lines)]
        except OSError as error:
            raise UserError(f"trace {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"trace {path}: not a text file") from None
        except ReplayError as error:
            raise UserError(f"{path}: {error}") from None
        if not records:
            raise UserError(f"trace {path}: no records")
        traces.append((path, records))
    timeline = build_timeline(traces)
    if args.svg:
        try:
            Path(args.svg).write_text(render_svg(timeline), encoding="utf-8")
        except OSError as error:
            raise UserError(f"svg {args.svg}: {error.strerror}") from None
    sys.stdout.write(render_text(timeline))
    return 0


def run_render(args: argparse.Namespace) -> int:
    from ferry import statecharts

    if args.check:
        stale = statecharts.stale_diagrams(args.dir)
        if stale:
            names = ", ".join(str(p) for p in stale)
            raise UserError(f"stale diagrams: {names}; run `ferry statecharts render`")
        return 0
    for path in statecharts.render_all(args.dir):
        print(path)
    return 0


def run_help(
    parser: argparse.ArgumentParser,
    modes: Mapping[str, argparse.ArgumentParser],
    args: argparse.Namespace,
) -> int:
    if args.topic is None:
        parser.print_help()
    elif args.topic in modes:
        modes[args.topic].print_help()
    else:
        print(
            f"ferry help: no mode named {args.topic!r} (modes: {', '.join(modes)})", file=sys.stderr
        )
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return run(args)
    except UserError as error:
        for line in str(error).splitlines() or [""]:  # a line per problem
            print(f"ferry: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
