"""``ferry drain``: move every export of a daemon to other daemons, a few at a time.

Only the daemons' control sockets are used, as an operator would: for each
export of the source, a target daemon (taken in turn) is told to listen for
it (``export.add``, mode ``listen``, under the same lease name), the
source is told to ``mirror`` it there with the ``exit`` action (so the
source's export goes once the target has control), and ``wait`` says how
it ended.  ``--parallel`` exports move at once.  An export that is blocked
(``ferry block``, a shared lease), that a target refuses, or whose
migration fails is left serving where it is, and its listening export on
the target is removed again; each export gets one line, the run a summary,
and the exit status is 0 only if every export moved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ferry.cli.errors import UserError
from ferry.migrate.options import CopyMode

__all__ = ["add_drain_command"]

#: How long one export's migration may take before drain stops waiting for it.
DEFAULT_TIMEOUT = 3600.0


def add_drain_command(modes: Any) -> None:
    drain = modes.add_parser(
        "drain",
        help="move every export of a daemon to other daemons, N at a time",
        description="Move every serving export of the daemon at --sock to the daemons at "
        "--to (in turn), --parallel at a time. Blocked or failed exports stay and are "
        "reported; exit 0 only if every export moved.",
    )
    drain.add_argument("-s", "--sock", required=True, help="the source daemon's control socket")
    drain.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="SOCK",
        help="a target daemon's control socket (repeat for more; exports go to each in turn)",
    )
    drain.add_argument(
        "--dir",
        metavar="DIR",
        help="the targets' image files are DIR/NAME for the source's file NAME "
        "(default: the source's path); they must exist, of the image's size",
    )
    drain.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="exports moving at once (default 1)"
    )
    drain.add_argument(
        "--copy-mode",
        choices=[mode.value for mode in CopyMode],
        default=None,
        help="each migration's copy mode (as ferry mirror's; default background)",
    )
    drain.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up waiting for one export's migration after this long (default 3600)",
    )
    drain.set_defaults(run=run_drain)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one export's move ended: ``moved``, or why it is left where it was."""

    name: str
    moved: bool
    line: str
    why: str = ""


class Refused(Exception):
    """A control request answered with an error; ``str`` is the server's line."""


def _call(sock: str, method: str, params: dict[str, Any], timeout: float = 60.0) -> Any:
    from ferry.control.client import ControlError, JsonControl

    try:
        with JsonControl(sock, timeout=timeout) as control:
            answer = control.call(method, params)
    except ControlError as error:
        raise Refused(str(error)) from None
    if "error" in answer:
        refusal = answer["error"]
        message = refusal.get("message", refusal) if isinstance(refusal, dict) else refusal
        raise Refused(str(message))
    return answer.get("result")


def run_drain(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        print("ferry drain: --parallel must be 1 or more", file=sys.stderr)
        raise SystemExit(2)
    try:
        rows = _call(args.sock, "export.list", {})
    except Refused as error:
        raise UserError(str(error)) from None
    say_lock = threading.Lock()

    def say(line: str) -> None:
        with say_lock:
            print(line, flush=True)

    jobs = [(row, args.to[i % len(args.to)]) for i, row in enumerate(rows)]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        outcomes = list(pool.map(lambda job: _move(args, job[0], job[1], say), jobs))
    moved = [o for o in outcomes if o.moved]
    left = [o for o in outcomes if not o.moved]
    summary = f"drain: {len(moved)} of {len(outcomes)} exports moved"
    if left:
        summary += "; left serving here: " + ", ".join(f"{o.name} ({o.why})" for o in left)
    say(summary)
    return 0 if not left else 1


def _move(
    args: argparse.Namespace, row: dict[str, Any], target: str, say: Callable[[str], None]
) -> Outcome:
    outcome = _try_move(args, row, target)
    say(outcome.line)
    return outcome


def _try_move(args: argparse.Namespace, row: dict[str, Any], target: str) -> Outcome:
    name = row["name"]

    def left(why: str) -> Outcome:
        return Outcome(name, False, f"{name}: {why}; left serving here", why)

    if row.get("state") != "serving":
        return left(f"not serving ({row.get('state')})")
    try:
        status = _call(args.sock, "status", {"export": name})
    except Refused as error:
        return left(f"no status: {error}")
    blockers = status.get("blockers") or []
    if blockers:
        return left("blocked: " + "; ".join(blockers))
    file = row["file"]
    if args.dir is not None:
        # The target's directory is not ours: a relative DIR means this one.
        file = os.path.join(os.path.abspath(args.dir), os.path.basename(file))
    listen: dict[str, Any] = {"name": name, "file": file, "mode": "listen"}
    lease = row.get("lease")
    if lease is not None:
        listen["resource"] = lease["resource"]
    try:
        _call(target, "export.add", listen)
    except Refused as error:
        return left(f"{target} refused it: {error}")  # nothing of ours there to take back
    try:
        address = _call(target, "status", {"export": name})["address"]
    except Refused as error:
        _remove_quietly(target, name)
        return left(f"{target} gave no address: {error}")
    started = time.monotonic()
    try:
        params: dict[str, Any] = {
            "args": [f"tcp:{address}", "exit"],
            "export": name,
            "dest_export": name,
        }
        if args.copy_mode is not None:
            params["copy_mode"] = args.copy_mode
        answer = _call(args.sock, "mirror", params)
        if not answer.get("ok", True):
            raise Refused(answer.get("message", "mirror refused"))
        ended = _call(args.sock, "wait", {"export": name}, timeout=args.timeout)
    except Refused as error:
        _remove_quietly(target, name)
        return left(f"failed: {error}")
    result = ended.get("result") or {}
    if result.get("state") == "completed" and result.get("handed_off"):
        seconds = time.monotonic() - started
        return Outcome(name, True, f"{name}: moved to {target} ({address}) in {seconds:.1f} s")
    _remove_quietly(target, name)
    reason = result.get("reason") or ended.get("last_error") or "no reason given"
    return left(f"failed: migration ended {result.get('state', 'unfinished')}: {reason}")


def _remove_quietly(target: str, name: str) -> None:
    """Take back the listening export a failed move left on ``target`` (if any)."""
    with contextlib.suppress(Refused):
        _call(target, "export.remove", {"name": name, "force": True})
